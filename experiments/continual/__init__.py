"""The task-sequence experiment: split digits, every forgetting defence, accuracy matrices."""
