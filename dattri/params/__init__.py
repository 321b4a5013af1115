"""Parameter classes (projection settings) shared by attributors."""
