"""MLflow "model from code" for a herd policy (self-contained: copied into the logged model, so it must not
import herd).

``predict(DataFrame with a "prompt" column) -> list of responses``: the chat rendering of each prompt,
answered by the saved ``LlamaForCausalLM`` (greedy unless ``params={"temperature": t}``), stopping at end
of turn. Weights load from safetensors only.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class Policy(PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        path = context.artifacts["model"]
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                      dtype=torch.float32).eval()
        cfg = context.model_config or {}
        self.max_new_tokens = int(cfg.get("max_new_tokens", 128))

    def predict(self, context, model_input, params=None):
        import torch

        params = params or {}
        temperature = float(params.get("temperature", 0.0))
        eot = self.tok.get_vocab().get("<|eot_id|>")
        stop = [t for t in (eot, self.tok.eos_token_id) if t is not None]
        out = []
        for prompt in model_input["prompt"]:
            ids = self.tok.apply_chat_template([{"role": "user", "content": str(prompt)}], tokenize=True,
                                               add_generation_prompt=True, return_dict=False)
            x = torch.tensor([list(ids)])
            with torch.no_grad():
                y = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=temperature > 0,
                                        temperature=temperature or None, max_new_tokens=self.max_new_tokens,
                                        eos_token_id=stop, pad_token_id=stop[0])
            out.append(self.tok.decode(y[0, x.shape[1]:], skip_special_tokens=True).strip())
        return out


mlflow.models.set_model(Policy())
