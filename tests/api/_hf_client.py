"""Run by tests/api/test_hub_protocol.py in a fresh process (its own HF_HOME and HF_ENDPOINT):
one huggingface_hub / transformers action, its outcome printed as JSON on the last line."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    action, repo_id, revision, out = sys.argv[1:5]
    result: dict[str, object] = {}
    try:
        if action == "snapshot":
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo_id, revision=revision))
            result["files"] = {
                p.relative_to(folder).as_posix(): p.resolve().read_bytes().hex()
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            }
            result["folder"] = str(folder)
        elif action == "download":
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(repo_id, out, revision=revision))
            result["bytes"] = path.read_bytes().hex()
        elif action == "upload_folder":
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(repo_id, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=out, revision=revision)
            result["commit"] = info.oid
        elif action == "push_to_hub":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(out)
            info = model.push_to_hub(repo_id, revision=revision)
            result["commit"] = getattr(info, "oid", None)
        elif action == "logits":
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(repo_id, revision=revision).eval()
            with torch.no_grad():
                logits = model(torch.tensor([[1, 5, 9, 2, 77, 3]])).logits
            torch.save(logits, out)
            result["saved"] = out
    except Exception as exc:  # the test asserts which error the client raised
        result["error"] = type(exc).__name__
        result["classes"] = [cls.__name__ for cls in type(exc).__mro__]
        result["message"] = str(exc)[:500]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
