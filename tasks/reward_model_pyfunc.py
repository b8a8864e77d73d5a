"""MLflow "model from code" for a herd reward model (self-contained: copied into the logged model, so it
must not import herd).

``predict(DataFrame with "prompt" and "response" columns) -> list of scalar rewards``: the chat
rendering of (prompt, response) scored at its last token by ``LlamaForSequenceClassification``.
Weights load from safetensors only.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class RewardModel(PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoTokenizer, LlamaForSequenceClassification

        path = context.artifacts["model"]
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = LlamaForSequenceClassification.from_pretrained(path, local_files_only=True,
                                                                    use_safetensors=True, dtype=torch.float32).eval()
        self.max_tokens = int((context.model_config or {}).get("max_tokens", 256))

    def predict(self, context, model_input, params=None):
        import torch

        out = []
        for prompt, response in zip(model_input["prompt"], model_input["response"]):
            msgs = [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(response)}]
            ids = list(self.tok.apply_chat_template(msgs, tokenize=True, return_dict=False))[-self.max_tokens:]
            with torch.no_grad():
                out.append(float(self.model(input_ids=torch.tensor([ids])).logits[0, 0]))
        return out


mlflow.models.set_model(RewardModel())
