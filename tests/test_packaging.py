"""Our kernels install as ``fasttrain_kernels``; Hugging Face's ``kernels`` distribution (which
transformers probes for) is never shadowed — also when Python runs from the repository root, where the
``kernels/`` source folder sits."""
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fasttrain_kernels_is_our_package():
    import fasttrain_kernels
    from fasttrain_kernels import lm_head_logprobs  # noqa: F401 - the import is what is tested

    assert Path(fasttrain_kernels.__file__).resolve().is_relative_to(REPO / "kernels")


def test_kernels_name_is_not_taken_from_the_repo_root():
    probe = (
        "import importlib.util, importlib.metadata as md, json\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "try:\n    version = md.version('kernels')\nexcept md.PackageNotFoundError:\n    version = None\n"
        "print(json.dumps({'origin': getattr(spec, 'origin', None), 'has_init': bool(spec and spec.origin),"
        " 'version': version, 'transformers_sees': bool(is_kernels_available())}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    import json

    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # Our kernels/ has no __init__.py: at most an empty namespace portion, never a regular package that would
    # win over an installed HF `kernels`; and transformers does not mistake it for HF kernels.
    assert seen["origin"] is None or "fasttrain" not in seen["origin"]
    assert seen["transformers_sees"] == (seen["version"] is not None)
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert importlib.util.find_spec("fasttrain_kernels") is not None
