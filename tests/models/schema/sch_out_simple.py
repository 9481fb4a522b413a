from typing import Any, Dict, List

from cog import BasePredictor, Path, Secret


class OutStr(BasePredictor):
    def predict(self) -> str:
        return "x"


class OutInt(BasePredictor):
    def predict(self) -> int:
        return 1


class OutFloat(BasePredictor):
    def predict(self) -> float:
        return 1.0


class OutBool(BasePredictor):
    def predict(self) -> bool:
        return True


class OutPath(BasePredictor):
    def predict(self) -> Path:
        return Path("x")


class OutSecret(BasePredictor):
    def predict(self) -> Secret:
        return Secret("x")


class OutListPath(BasePredictor):
    def predict(self) -> List[Path]:
        return []


class OutDict(BasePredictor):
    def predict(self) -> Dict[str, int]:
        return {}


class OutAny(BasePredictor):
    def predict(self) -> Any:
        return None
