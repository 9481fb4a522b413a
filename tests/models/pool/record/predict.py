# The prediction record's fixture: a secret, a float, big logs, big or non-finite output.
import hashlib
import sys
import time
from typing import Any, Optional

from cog import BasePredictor, Input, Secret


class Predictor(BasePredictor):
    def predict(
        self,
        tag: str = "",
        token: Optional[Secret] = None,
        weight: float = 1.0,
        log_bytes: int = Input(default=0, ge=0),
        out_bytes: int = Input(default=0, ge=0),
        nan_out: bool = False,
        sleep_s: float = Input(default=0.0, ge=0),
    ) -> Any:
        if log_bytes:
            line = "x" * 99 + "\n"
            for i in range(log_bytes // 100):
                sys.stdout.write(f"{i:08d}" + line[8:])
        time.sleep(sleep_s)
        if nan_out:
            return {"score": float("nan")}
        secret = token.get_secret_value() if token is not None else None
        return {
            "tag": tag,
            "weight": weight,
            # proof that the runner got the real value, without echoing it
            "token_sha256": hashlib.sha256(secret.encode()).hexdigest() if secret else None,
            "blob": "o" * out_bytes,
        }
