"""Training and evaluation data: the synthetic task and question/answer JSONL files (numpy/Pillow only)."""
