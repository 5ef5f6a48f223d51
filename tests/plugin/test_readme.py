"""The README's scripted session runs as written (with a test checkpoint instead of a download)."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).parents[2] / "README.md"


def scripted_example() -> str:
    text = README.read_text()
    section = text[text.index("### Scripted sessions"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_scripted_session(make_napari_viewer, tiny_checkpoint):
    code = scripted_example()
    assert 'sam.set_model("vit_b_lm")' in code and "napari.Viewer()" in code
    code = code.replace('sam.set_model("vit_b_lm")', f'sam.set_model(checkpoint=r"{tiny_checkpoint}")')
    code = code.replace("napari.Viewer()", "make_napari_viewer()")
    namespace = {"make_napari_viewer": make_napari_viewer}
    exec(compile(code, str(README), "exec"), namespace)
    labels = namespace["labels"]
    assert labels.shape == (32, 256, 256)
    assert set(np.unique(labels)) == {0, 1, 2}  # three commits, one undone
    assert (labels[16] == 1).any() and not (labels[:16] > 0).any()
