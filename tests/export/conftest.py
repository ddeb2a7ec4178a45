from pathlib import Path

ORACLE = Path(__file__).parents[1] / "fixtures" / "oracle"
EXAMPLES = Path(__file__).parents[2] / "examples"
