"""The README's "Use concept_ext from SAELens or sparsify" example runs as written (issue 25, item 6)."""
from __future__ import annotations

import re
from pathlib import Path

from interop_peers import need

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "### Use concept_ext from SAELens or sparsify"


def readme_example() -> str:
    """The first ```python block after the section heading."""
    text = README.read_text()
    assert HEADING in text, f"README.md lost the section {HEADING!r}"
    block = re.search(r"```python\n(.*?)```", text[text.index(HEADING):], re.S)
    assert block, f"no python code block under {HEADING!r}"
    return block.group(1)


def test_readme_interop_example_runs():
    need("sparsify")
    need("sae_lens")
    code = readme_example()
    assert len(code.strip().splitlines()) <= 14  # a short example, as the issue asks
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    sae, coder = namespace["sae"], namespace["coder"]
    assert type(sae).__name__ == "TopKSAE" and coder.encoder.weight.grad is not None
    assert "forward" not in coder.__dict__  # the with-block undid the acceleration
    sl = need("sae_lens")
    lib = sl.SAE.load_from_disk(namespace["folder"] + "/sl")  # the export the example wrote
    x = namespace["x"]
    import torch
    torch.testing.assert_close(lib(x), sae(x).h_hat, atol=1e-5, rtol=1e-5)
