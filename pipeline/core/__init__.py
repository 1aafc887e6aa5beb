"""What every stage stands on: parameters and the one-line errors, file and image io, the stores
and what they were made from, the registry of stages and stores, and the stage plumbing."""
