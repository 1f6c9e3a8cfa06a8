"""Info and Embed servicers: validate, convert, call the batcher."""

from __future__ import annotations

import asyncio
import importlib.metadata

from sieve_client._proto import common_pb2, embed_pb2, embed_pb2_grpc, info_pb2, info_pb2_grpc

from .auth import require
from .errors import invalid, rpc, rpc_stream
from .interceptors import request_id
from .state import PRECISION_ENUM, Plan, ServerState, deadline_of, prepare

STREAM_AHEAD = 8  # messages of one EmbedStream in the batcher at once


def metadata(outcome) -> common_pb2.Metadata:
    return common_pb2.Metadata(tokens=outcome.tokens, queue_time_ns=outcome.queue_ns,
                               inference_time_ns=outcome.inference_ns, request_id=request_id.get())


def embeddings(vectors, precision: str) -> list[embed_pb2.Embedding]:
    if precision == "float32":
        return [embed_pb2.Embedding(float32=embed_pb2.FloatValues(values=row)) for row in vectors.tolist()]
    if precision == "int8":
        return [embed_pb2.Embedding(int8=row.tobytes()) for row in vectors]
    return [embed_pb2.Embedding(binary=row.tobytes()) for row in vectors]


class InfoServicer(info_pb2_grpc.InfoServiceServicer):
    def __init__(self, state: ServerState, auth_enabled):
        self.state = state
        self.auth_enabled = auth_enabled  # async () -> bool

    @rpc
    async def Info(self, request, context):
        s = self.state.settings
        loaded = self.state.models.loaded()
        models = []
        for name in self.state.models.names():
            emb = loaded.get(name)
            if emb is None:
                models.append(info_pb2.ModelInfo(name=name, loaded=False))
                continue
            models.append(info_pb2.ModelInfo(
                name=name, dim=emb.dim, max_length=emb.max_length, default_pooling=emb.encoder.default_pooling,
                query_instruction=emb.query_instruction, document_instruction=emb.document_instruction, loaded=True,
                int8_calibrated=emb.calibration is not None))
        limits = info_pb2.Limits(max_texts_per_request=s.max_texts_per_request,
                                 max_batch_tokens=self.state.batcher.max_batch_tokens,
                                 max_queued_texts=s.max_queued_texts, max_message_bytes=s.max_message_bytes,
                                 max_k=s.max_k, max_documents_per_upsert=s.max_documents_per_upsert,
                                 max_rerank_passages=s.max_rerank_passages,
                                 max_answer_passages=s.max_answer_passages, max_new_tokens=s.max_new_tokens,
                                 max_waiting_generations=s.max_waiting_generations)
        gen = self.state.generation
        generation = {}
        if gen is not None:
            answerers = [info_pb2.GenerationModelInfo(name=slot.name, loaded=slot.model is not None, block_size=k,
                                                      **_answer_defaults(slot))
                         for k, slot in gen.answer_slots()]
            if gen.rerank_slot.loader is not None:
                generation["reranker"] = info_pb2.GenerationModelInfo(name=gen.rerank_slot.name,
                                                                      loaded=gen.rerank_slot.model is not None)
            if answerers:
                generation.update(answerer=answerers[0], answerers=answerers)
        return info_pb2.InfoResponse(version=_version(), default_model=self.state.models.default, models=models,
                                     limits=limits, auth_enabled=await self.auth_enabled(), **generation)


class EmbedServicer(embed_pb2_grpc.EmbedServiceServicer):
    def __init__(self, state: ServerState):
        self.state = state

    @rpc
    async def Embed(self, request, context):
        require("embed")
        texts = self.state.check_texts(request.texts)
        plan = await self.state.plan(request.options)
        vectors, outcome = await self.state.embed(plan, texts, timeout=deadline_of(context))
        return embed_pb2.EmbedResponse(embeddings=embeddings(vectors, plan.precision), model=plan.model,
                                       dim=plan.dim, precision=PRECISION_ENUM[plan.precision],
                                       metadata=metadata(outcome))

    @rpc_stream
    async def EmbedStream(self, request_iterator, context):
        """Reads ahead (up to STREAM_AHEAD messages in the batcher), answers in order, waits for queue room."""
        require("embed")
        state = self.state
        ahead: asyncio.Queue = asyncio.Queue(STREAM_AHEAD)
        plan: Plan | None = None

        async def read():
            nonlocal plan
            try:
                n = 0
                async for message in request_iterator:
                    if plan is None:
                        plan = await state.plan(message.options)
                    elif message.HasField("options"):
                        raise invalid(f"messages[{n}].options", "only the stream's first message may carry options")
                    texts = state.check_texts(message.texts, f"messages[{n}].texts")
                    await ahead.put(asyncio.ensure_future(
                        state.embed(plan, texts, timeout=deadline_of(context), wait=True,
                                    field=f"messages[{n}].texts")))
                    n += 1
                await ahead.put(None)
            except Exception as e:
                await ahead.put(e)

        reader = asyncio.ensure_future(read())
        sequence = 0
        try:
            while True:
                item = await ahead.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                vectors, outcome = await item
                yield embed_pb2.EmbedStreamResponse(embeddings=embeddings(vectors, plan.precision), sequence=sequence,
                                                    dim=plan.dim, metadata=metadata(outcome))
                sequence += 1
        finally:  # the caller left or a message failed: stop reading, drop queued work
            reader.cancel()
            while not ahead.empty():
                item = ahead.get_nowait()
                if isinstance(item, asyncio.Future):
                    item.cancel()

    @rpc
    async def Tokenize(self, request, context):
        require("embed")
        texts = self.state.check_texts(request.texts)
        embedder = await self.state.models.get(request.model, field="model")
        if request.HasField("instruction"):
            instruction = request.instruction
        else:
            instruction = embedder.query_instruction if request.query else ""
        truncate = request.truncate if request.HasField("truncate") else True

        items = await asyncio.to_thread(prepare, embedder.encoder, texts, instruction, truncate, "texts")
        tokens = [embed_pb2.Tokens(ids=ids, pieces=_pieces(embedder.encoder, ids), instruction_tokens=flags.count(0))
                  for ids, flags in items]
        return embed_pb2.TokenizeResponse(tokens=tokens, model=request.model or self.state.models.default)


def _pieces(encoder, ids: list[int]) -> list[str]:
    """Token strings where the encoder's tokenizer can give them, else none."""
    tok = getattr(encoder, "tokenizer", None)
    if tok is not None and hasattr(tok, "convert_ids_to_tokens"):  # HF tokenizer (sentence-transformers)
        return [str(p) for p in tok.convert_ids_to_tokens(ids)]
    backbone = getattr(encoder, "backbone", None)
    inner = getattr(getattr(backbone, "tokenizer", None), "tok", None)  # sieve.backbone Tokenizer -> tokenizers
    if inner is not None:
        return [inner.id_to_token(i) or "" for i in ids]
    return []


def _version() -> str:
    try:
        return importlib.metadata.version("sieve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _answer_defaults(slot) -> dict:
    """What Answer does with expansion / policy unset on this REFRAG model: the loaded model's, else its folder's
    refrag.json (a few hundred bytes); nothing when neither can be read."""
    if slot.model is not None:
        refrag = slot.model.refrag
        return {"default_expansion": refrag.expansion, "default_policy": refrag.policy}
    from sieve.refrag import RefragConfig, resolve_refrag

    try:
        cfg = RefragConfig.load(resolve_refrag(slot.name))
    except (OSError, ValueError):
        return {}
    return {"default_expansion": cfg.expansion, "default_policy": cfg.policy}
