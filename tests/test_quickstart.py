"""The README quickstart, run verbatim: its code block is extracted from README.md and executed,
and its samples must be within 2x the data-vs-data floor (sliced W2). docs/quickstart.md and
notebooks/01_quickstart.ipynb must contain the same code, so the three cannot drift apart."""

import json
import pathlib
import re

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quickstart_code() -> str:
    """The first ```python block under the README's "## Quickstart" heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quickstart", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README.md: no python block under ## Quickstart"
    return m.group(1)


def test_readme_quickstart_runs_and_samples_within_2x_of_the_floor():
    import jaxdiff
    from jaxdiff import metrics

    ns: dict = {}
    exec(compile(quickstart_code(), "README.md:quickstart", "exec"), ns)  # noqa: S102
    dist = jaxdiff.analytic.ring_mixture()  # the README's data
    n = ns["x0"].shape[0]
    key = jax.random.PRNGKey(12345)  # evaluation noise, independent of the README's key
    floor = float(metrics.sliced_wasserstein_floor(key, dist.sample, n))
    for name in ("x0", "x0_ode"):
        x = ns[name]
        assert x.shape == (n, 2) and bool(np.all(np.isfinite(np.asarray(x))))
        sw = np.mean([
            float(metrics.sliced_wasserstein(jax.random.fold_in(key, 10 + r), x,
                                             dist.sample(jax.random.fold_in(key, 20 + r), n)))
            for r in range(4)
        ])  # fmt: skip
        assert sw < 2.0 * floor, (name, sw, floor)


def test_docs_quickstart_and_notebook_01_run_the_readme_code():
    code = quickstart_code().strip()
    docs = (ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")
    assert code in docs, "docs/quickstart.md does not contain the README quickstart block"
    nb = json.loads((ROOT / "notebooks" / "01_quickstart.ipynb").read_text(encoding="utf-8"))
    cells = ["".join(c["source"]).strip() for c in nb["cells"] if c["cell_type"] == "code"]
    assert code in cells, "notebooks/01_quickstart.ipynb has no cell with the README quickstart"
