"""What writes Orca 2's answers: the contract every backend implements (contract.py), the answer
stream and the sampling settings they share, the local model (local/) and an inference server."""
