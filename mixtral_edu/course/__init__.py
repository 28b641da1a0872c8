"""What the notebooks need beyond the model: exercise checkers, diagrams, the workshop's helpers."""
