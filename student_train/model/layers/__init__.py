"""The student's building blocks: KDA, full attention, MLPs, norms, token layout."""
