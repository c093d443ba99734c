"""Reading and writing the formats of neighbouring tools (DistillKit, axolotl)."""
