"""The README's Python snippets run as written (in order, sharing one namespace)."""
import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_python_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    # The snippets computed what they claim.
    assert namespace["g_delta"].shape == namespace["batch"]["x_start"].shape
    assert float(namespace["loss"]) > 0
    for name in ("ddim", "iddpm", "es", "dpm"):
        assert namespace[name].shape == (4, 16, 16, 3)
