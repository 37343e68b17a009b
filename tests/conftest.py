"""Every test imports the project's flat modules (model, train, ...) from the repository root."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# The real parent model (SmolLM2-135M-Instruct Q4_1 GGUF), where `python data/smollm2.py` (demo.sh, .ci/run)
# put it, or LLAMA_MOE_SMOLLM2_GGUF. Tests on it are skipped when it is absent.
SMOLLM2_GGUF = os.environ.get("LLAMA_MOE_SMOLLM2_GGUF",
                              os.path.join(REPO, "data", "downloads", "SmolLM2-135M-Instruct.Q4_1.gguf"))


def smollm2_gguf():
    return SMOLLM2_GGUF if os.path.isfile(SMOLLM2_GGUF) else None
