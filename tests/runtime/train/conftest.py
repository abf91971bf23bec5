import json

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("ARLE_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture
def chat_data(tmp_path):
    records = [
        [{"role": "user", "content": "What is the arle project's mascot?"}, {"role": "assistant", "content": "A red panda."}],
        [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "Blue."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}],
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in records))
    return path
