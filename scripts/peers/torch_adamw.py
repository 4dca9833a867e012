# PyTorch AdamW (default foreach implementation) over GPT-2 124M parameters, 2 threads, fp32.
import json, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.set_num_threads(2)
model = GPT2LMHeadModel(GPT2Config(vocab_size=50304))
params = [p for p in model.parameters()]
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
opt.step()
times = []
for _ in range(5):
    t = time.perf_counter(); opt.step(); times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"params": sum(p.numel() for p in params), "median_step_ms": times[2] * 1e3}))
