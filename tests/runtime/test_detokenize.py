"""Streaming text equals the full decode, never shows half a character."""

from tokenizers import Tokenizer

from arle_runtime.detokenize import TextStream


def _tokenizer():
    from arlec.sources import load_source

    return Tokenizer.from_str(load_source(None).tokenizer_json)


def test_stream_deltas_concatenate_to_full_decode():
    tok = _tokenizer()
    text = "Héllo wörld! 日本語のテキスト 🙂🙂 and   spaces\n\nnew lines, numbers 12345."
    ids = tok.encode(text, add_special_tokens=False).ids
    stream = TextStream(tok)
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids) == stream.text
    assert all("\ufffd" not in d for d in deltas)
