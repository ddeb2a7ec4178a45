"""PyTorch reference SleighVL (InternVL2 + GSWA) and InternVL2 checkpoint conversion."""
