"""One typed `Settings` object, read from `SIEVE_*` environment variables once and passed down.

Library code never reads the environment itself: it takes the values it needs as arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIEVE_", extra="ignore")

    home: Path = Field(Path("~/.cache/sieve"), description="where converted weights, databases and indexes live")
    backbone: str = Field(
        "smollm2-135m-instruct",
        description="a registered backbone name, or a path to a .gguf file or a HF llama/qwen2 safetensors folder",
    )
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU"
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; unset: torch's default")
    log_level: str = Field("INFO", description="logging level of the sieve loggers")
    data_dir: Path | None = Field(
        None, description="the shared evaluation/training data; unset: ../shared/data beside the checkout, "
        "else /work/shared/data")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the store, e.g. postgresql+psycopg://user@host:5432/sieve; "
        "unset: the SQLite file <home>/sieve.db")
    index_dir: Path | None = Field(None, description="where FAISS index snapshots live; unset: <home>/indexes")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'sieve.db'}"

    def index_path(self) -> Path:
        return self.index_dir.expanduser() if self.index_dir is not None else self.home / "indexes"

    def data_path(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir.expanduser()
        beside = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
        return beside if beside.is_dir() else Path("/work/shared/data")

    @field_validator("home")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"device {v!r} is not auto, cpu, cuda or cuda:N")
        return v
