"""The repository carries its own architecture document, and it matches the code it describes."""

import re

from sleigh.runtime.package import SCHEMA_VERSION
from tests.helpers import ROOT



def test_readme_links_design_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\(([^)#]+\.md)\)", readme))
    assert "DESIGN.md" in linked, linked
    for name in linked:
        assert (ROOT / name).is_file(), f"README links {name}, which is not in the repository"
    assert "shared folder" not in readme


def test_design_describes_the_current_decoder_contract():
    design = (ROOT / "DESIGN.md").read_text()
    assert SCHEMA_VERSION == 7, "update DESIGN.md's module contracts with the schema"
    assert "decoder.onnx         (schema 4)" in design and "logits[B,1,V]" in design
    assert "(schema 6) The fused form also takes input_ids[B,S]" in design
    assert "(schema 7) text alone passes M = 0" in design and "`manifest.json` (schema 7)" in design
    assert "attention_bias[B,C+S]" in design and "[B, C+S]" in design
    assert "P+S" not in design  # schema 1's bias over past + new positions


def test_design_layout_names_every_subpackage():
    design = (ROOT / "DESIGN.md").read_text()
    layout = design[design.index("## Package layout"):]
    layout = layout[:layout.index("\n## ", 1)]
    packages = sorted(p.parent.name for p in (ROOT / "sleigh").glob("*/__init__.py"))
    assert packages, "no subpackages found"
    missing = [name for name in packages if f"  {name}/" not in layout]
    assert not missing, f"DESIGN.md's package layout lacks {missing}"
