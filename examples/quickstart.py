"""Pick a coreset of one source batch with a tiny Llama + LoRA (runs in seconds, offline)."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from colm import CoresetSelector, SelectorConfig, find_value_block

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
model = get_peft_model(
    LlamaForCausalLM(config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
)
print(find_value_block(model).describe())  # the parameter block whose gradient is the feature

# a source batch of 16 examples from 3 sources; prompt tokens are masked out of the labels
g = torch.Generator().manual_seed(0)
input_ids = torch.randint(0, 100, (16, 24), generator=g)
labels = input_ids.clone()
labels[:, :8] = -100
batch = {
    "input_ids": input_ids,
    "attention_mask": torch.ones_like(input_ids),
    "labels": labels,
    "source": ["gsm"] * 9 + ["aqua"] * 5 + ["gcd"] * 2,
}
# examples per source in the whole training set: "gcd" is small (below the mean), kept whole
counts = {"gsm": 9000, "aqua": 7000, "gcd": 120}
selector = CoresetSelector(SelectorConfig(ratio=0.5), counts)  # random picks in big sources
paper = CoresetSelector(SelectorConfig.preset("paper", ratio=0.5), counts)  # medoids of features
for step in range(2):
    for name, s in (("default", selector), ("paper", paper)):
        sel = s.select(model, batch)
        print(step, name, sel.indices.tolist(), sel.stats["sources"])
state = paper.state_dict()  # Adam moments, generator, step: save it with your checkpoint
