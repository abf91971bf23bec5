"""TTFT of the first requests after load, one at a time: 5 fresh 128-token prompts, 5 more,
then the first 5 again (prefix-cache hits), 4 new tokens each; and the GPU time of the
1 x 128 prefill graph. Shows what a bucket's first use costs.

    python benchmarks/ttft_first_requests.py BUNDLE
"""
import json
import sys

sys.path.insert(0, "benchmarks")
from arle_runtime.preload import reexec_with_system_libstdcxx
reexec_with_system_libstdcxx()
from cuda_h200 import prompt_ids  # noqa: E402
from arle_runtime.engine import Engine, EngineConfig  # noqa: E402
from arle_runtime.sampler import SamplingParams  # noqa: E402
from arle_runtime.session import Session  # noqa: E402
bundle = sys.argv[1]
m = json.load(open(bundle + "/manifest.json"))
print("fused:", m["programs"].get("decode_fused", {}).get("path"), m["programs"]["decode_paged"].get("fused_decode"))
s = Session.open(bundle, verify=False)
e = Engine(s.executor, s.tokenizer, (), EngineConfig(max_batch=64))
g = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
out = {}
for name in ("fresh", "again"):
    out[name] = [round(e.generate([prompt_ids(7000 + i + (50 if name == "again" else 0))], g)[0].ttft_s * 1000, 2) for i in range(5)]
# the same prompts again: prefix-cache hits through the past buckets
out["hits"] = [round(e.generate([prompt_ids(7000 + i)], g)[0].ttft_s * 1000, 2) for i in range(5)]
pg = s.executor.prefill_graphs
out["replay_ms_1x128"] = round(pg.replay_ms((1, 128, 0)), 3)
print(json.dumps(out))
