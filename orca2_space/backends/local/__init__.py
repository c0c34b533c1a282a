"""The local backend: Orca 2 loaded in this process. The only package that imports torch and
transformers; nothing outside it imports it except cli.backend_loader, for a local model."""
