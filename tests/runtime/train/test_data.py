"""`arle-runtime data convert` and the assistant-only loss mask."""

import json

import pytest
from click.testing import CliRunner

from arle_runtime.cli import cli

from arle_runtime.errors import ArleError
from arle_runtime.train.data import convert_file
from conftest import assert_clean_error, run_cli


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "fmt, record, messages",
    [
        ("alpaca", {"instruction": "Add", "input": "2 and 3", "output": "5"},
         [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]),
        ("dolly", {"instruction": "Summarize", "context": "", "response": "Short.", "category": "summarization"},
         [{"role": "user", "content": "Summarize"}, {"role": "assistant", "content": "Short."}]),
        ("sharegpt", {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                        {"from": "gpt", "value": "Hello!"}]},
         [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}]),
        ("chat", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "answer": "Yo"},
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
    ],
)
def test_convert_writes_chat_messages(tmp_path, fmt, record, messages):
    out = tmp_path / "out.jsonl"
    assert convert_file(write_jsonl(tmp_path / "in.jsonl", [record]), out, fmt) == 1
    assert read_jsonl(out)[0]["messages"] == messages


def test_convert_reads_a_json_array(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]))
    assert convert_file(src, tmp_path / "out.jsonl", "alpaca") == 2


def test_convert_bad_line_is_named_and_nothing_is_written(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(ArleError, match=r"in.jsonl line 2 lacks a non-empty string 'output'"):
        convert_file(src, out, "alpaca")
    assert not out.exists()


def test_convert_cli_invalid_json_exits_2_with_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    proc = run_cli("arle-runtime", "data", "convert", "--format", "alpaca", str(src), str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2
    assert_clean_error(proc, "line 2 is not valid JSON")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_convert_cli_reports_the_count(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                                  {"from": "gpt", "value": "a"}]}])
    result = CliRunner().invoke(cli, ["data", "convert", "--format", "sharegpt", str(src), str(tmp_path / "o.jsonl")])
    assert result.exit_code == 0, result.output
    assert "converted 1 records" in result.output


def test_label_mask_covers_only_assistant_content_and_end_token(tiny_hf_model):
    from arle_runtime.chat import ChatTemplate
    from arle_runtime.train.checkpoint import load_source
    from arle_runtime.train.data import encode_chat

    src = load_source(str(tiny_hf_model))
    template = ChatTemplate(src.chat_template, src.bos_token, src.eos_token)
    tok = src.tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "six"}]
    ex = encode_chat(template, tok, messages, src.eos_token)
    learned = tok.decode([i for i, keep in zip(ex.ids, ex.labels) if keep], skip_special_tokens=False)
    assert learned == "4<|im_end|>six<|im_end|>"
    assert len(ex.ids) == len(ex.labels) and not ex.labels[0]
