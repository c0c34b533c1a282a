"""Publish this app as a Hugging Face Space.

    python -m orca2_space.publish OWNER/NAME [--private] [--hardware a10g-small] [--dry-run]

Uploads exactly the files the Space runs (an allow-list, so no caches, venvs, tests or local
models), and sets the moderation secrets when they are in the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, SpaceCard, SpaceHardware, get_token
from huggingface_hub.errors import HfHubHTTPError

ROOT = Path(__file__).resolve().parent.parent

# What the Space runs: the entry point, the package (its subpackages and its data too), its pins, its
# card, the pages the card links to, and the card's images.
SPACE_FILES = ("app.py", "requirements.txt", "README.md")
SPACE_GLOBS = ("orca2_space/**/*.py", "orca2_space/data/*.jsonl", "docs/*.md", "assets/*.png")
# Remote files under these that are no longer in the allow-list are removed (a deleted module must
# not linger on the Space).
STALE_PATTERNS = ["orca2_space/*", "docs/*", "assets/*"]
SECRET_NAMES = ("CONTENT_SAFETY_ENDPOINT", "CONTENT_SAFETY_KEY")
HARDWARE = [hardware.value for hardware in SpaceHardware]


class PublishError(Exception):
    """Something the user must fix before publishing; the message says what."""


@dataclass(frozen=True)
class Plan:
    space_id: str
    private: bool
    hardware: str | None
    files: tuple[tuple[str, int], ...]  # path in the Space, size in bytes
    card: dict
    secrets: tuple[str, ...]  # names only: values never leave the environment until upload

    def describe(self) -> str:
        total = sum(size for _, size in self.files)
        lines = [
            f"Space      https://huggingface.co/spaces/{self.space_id} ({'private' if self.private else 'public'})",
            f"Hardware   {self.hardware or 'unchanged (the card suggests ' + str(self.card.get('suggested_hardware')) + ')'}",
            f"Secrets    {', '.join(self.secrets) if self.secrets else 'none (moderation stays off until they are set)'}",
            f"Files      {len(self.files)}, {total / 1024:.0f} KiB",
            *(f"  {size:>9,}  {path}" for path, size in self.files),
            "Front matter",
            *(f"  {key}: {value}" for key, value in self.card.items()),
        ]
        return "\n".join(lines)


def space_files(root: Path = ROOT) -> tuple[tuple[str, int], ...]:
    paths = [root / name for name in SPACE_FILES]
    for pattern in SPACE_GLOBS:
        paths.extend(sorted(root.glob(pattern)))
    return tuple((path.relative_to(root).as_posix(), path.stat().st_size) for path in paths)


def card_metadata(root: Path = ROOT) -> dict:
    """README's front matter, read by huggingface_hub as the Hub reads it."""
    return SpaceCard.load(root / "README.md").data.to_dict()


def make_plan(space_id: str, private: bool, hardware: str | None, environ=os.environ, root: Path = ROOT) -> Plan:
    owner, _, name = space_id.partition("/")
    if not owner or not name or "/" in name:
        raise PublishError(f"'{space_id}' is not a Space id: use OWNER/NAME, e.g. your-name/orca2")
    if hardware is not None and hardware not in HARDWARE:
        raise PublishError(f"unknown hardware '{hardware}'; one of: {', '.join(HARDWARE)}")
    secrets = tuple(name for name in SECRET_NAMES if environ.get(name))
    if len(secrets) == 1:
        raise PublishError(
            f"{secrets[0]} is set but {(set(SECRET_NAMES) - set(secrets)).pop()} is not: moderation needs both"
        )
    return Plan(space_id, private, hardware, space_files(root), card_metadata(root), secrets)


def missing_preloads(card: dict, list_repo_files) -> list[str]:
    """Files the card preloads that its model repositories don't have (the build would fail)."""
    missing = []
    for entry in card.get("preload_from_hub", []):
        repo, _, files = entry.partition(" ")
        if files:
            present = set(list_repo_files(repo))
            missing += [f"{repo}/{name}" for name in files.split()[0].split(",") if name not in present]
    return missing


def publish(plan: Plan, token: str, environ=os.environ, root: Path = ROOT) -> str:
    api = HfApi(token=token)
    missing = missing_preloads(plan.card, api.list_repo_files)
    if missing:
        raise PublishError(f"README's preload_from_hub names files the Hub doesn't have: {', '.join(missing)}")
    api.create_repo(plan.space_id, repo_type="space", space_sdk="gradio", private=plan.private, exist_ok=True)
    for name in plan.secrets:
        api.add_space_secret(plan.space_id, name, environ[name])
    api.upload_folder(
        repo_id=plan.space_id,
        repo_type="space",
        folder_path=root,
        allow_patterns=[path for path, _ in plan.files],
        delete_patterns=STALE_PATTERNS,
        commit_message="Publish orca2-space",
    )
    if plan.hardware:
        api.request_space_hardware(plan.space_id, SpaceHardware(plan.hardware))
    return f"https://huggingface.co/spaces/{plan.space_id}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orca2_space.publish",
        description="Create or update a Hugging Face Space running this app. The token comes from HF_TOKEN "
        "or `hf auth login`. CONTENT_SAFETY_ENDPOINT and CONTENT_SAFETY_KEY, when set here, become the Space's "
        "secrets (moderation on).",
    )
    p.add_argument("space_id", metavar="OWNER/NAME", help="the Space to create or update")
    p.add_argument("--private", action="store_true", help="create the Space private")
    p.add_argument(
        "--hardware",
        metavar="FLAVOR",
        help=f"request this hardware (paid), e.g. a10g-small or zero-a10g; one of {', '.join(HARDWARE)}",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be uploaded and set, without network")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        plan = make_plan(args.space_id, args.private, args.hardware)
        print(plan.describe())
        if args.dry_run:
            return 0
        token = get_token()
        if not token:
            raise PublishError(
                "no Hugging Face token: set HF_TOKEN to a write token from https://huggingface.co/settings/tokens "
                "or run `hf auth login`"
            )
        print(f"Published: {publish(plan, token)}")
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except HfHubHTTPError as error:
        # e.g. a read-only token, a name taken by someone else, hardware the account can't request
        print(f"error: the Hub refused: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
