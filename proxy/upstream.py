"""The seam between the request path and the provider types: what `forward` asks of a provider.

Each type (`proxy/providers/…`: openai, azure, gemini, anthropic, mock) builds the upstream request
from an OpenAI chat request, sends it, classifies a refusal, reads an answer and converts a stream
into OpenAI's shapes; `forward` never asks which type it talks to. A type whose upstream speaks
Anthropic's Messages API also offers `native_messages()`: the same interface for clients of
`/v1/messages`, their bytes passed through. This module holds only the interface and its value
types; it imports nothing of the request path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from .config import AccountConfig, ModelConfig, ProviderConfig
from .faults import Verdict
from .httpmessage import UpstreamFailure
from .validation import ChatRequest

if TYPE_CHECKING:
    from .messages_validation import MessagesRequest

__all__ = [
    "Answer", "Around", "Exchange", "InBandError", "NativeMessages", "Outbound", "Prepared", "Provider",
    "StreamReader", "UpstreamFailure",
]


class Outbound(Protocol):
    """What a provider reads of the request it serves (the pipeline's `Call`)."""

    @property
    def chat(self) -> ChatRequest | None: ...

    @property
    def model(self) -> ModelConfig | None: ...

    @property
    def messages(self) -> MessagesRequest | None:
        """The Anthropic Messages request, when the client spoke that API (`chat` is None then)."""

    @property
    def request_id(self) -> str: ...

    def upstream_request(self, upstream_model: str, *, ask_usage: bool = True) -> bytes:
        """The client's bytes for `upstream_model`, changed only where they must be (a stream asks
        for its usage unless `ask_usage` is false)."""

    def upstream_messages(self, upstream_model: str) -> bytes:
        """The client's Messages request bytes with only `model` changed (when it differs)."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """One request as a provider will send it; reused by every attempt on that provider."""

    body: bytes
    stream: bool = False
    include_usage: bool = False  # the client asked for the usage chunk
    json_mode: bool = False  # response_format emulated by a forced tool (anthropic)
    path: bytes = b""  # the request target, when it differs per request (azure deployments)
    headers: bytes = b""  # header lines of this request beyond the account's (anthropic-version)
    client: Any = None  # what the client's API needs to render the answer (conversion state)


@dataclass(frozen=True, slots=True)
class Answer:
    """A JSON answer in OpenAI's shape for the client, and its usage for settlement."""

    body: bytes
    usage: Any


class Exchange(Protocol):
    """One upstream answer being read: status and headers first, then the body in chunks."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes:
        """The next body chunk as it arrives; b"" at the end."""

    @property
    def finished(self) -> bool:
        """Whether the whole body has been read."""

    def close(self) -> None:
        """Stops reading; an unfinished upstream request is aborted."""


class StreamReader(Protocol):
    """An upstream stream turned into the client's OpenAI SSE bytes as they come.

    `feed` returns what may be sent now (b"" while nothing is visible to the client: the
    response commits at the first bytes it returns); it raises `UpstreamFailure` on a broken
    stream and `InBandError` when the upstream reports an error inside it.
    """

    @property
    def done(self) -> bool:
        """Whether the stream ended as it should (the client has its end marker)."""

    @property
    def usage(self) -> Any: ...

    def feed(self, chunk: bytes) -> bytes: ...


class Around:
    """A `StreamReader` around another, rewriting what it returns: the stream ends, and its usage
    is, the inner reader's. Subclasses define `feed`."""

    __slots__ = ("_inner",)

    def __init__(self, inner: StreamReader) -> None:
        self._inner = inner

    @property
    def done(self) -> bool:
        return self._inner.done

    @property
    def usage(self) -> Any:
        return self._inner.usage


class InBandError(Exception):
    """An error the upstream reported inside a 200 stream, classified like a status would be.

    `tail` is what the client still gets after commit when the upstream's own events end the
    stream in the client's protocol (a pass-through relays the upstream's `event: error` as it
    came): the events before the error, then the error itself, and no gateway error after it.
    """

    def __init__(self, verdict: Verdict, detail: str, *, tail: bytes = b"") -> None:
        super().__init__(detail)
        self.verdict = verdict
        self.detail = detail
        self.tail = tail


class Provider(Protocol):
    config: ProviderConfig

    def prepare(self, call: Outbound, upstream_model: str) -> Prepared:
        """The request for this provider; raises GatewayError (400 `unsupported_field`) for what
        its upstream cannot express."""

    async def send(self, account: AccountConfig, prepared: Prepared, request_id: str) -> Exchange: ...

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float, *, wall_now: float
    ) -> Verdict:
        """The fault class of a non-2xx answer (SPEC §5)."""

    def relay(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[bytes, dict[str, str]]:
        """A caller-fault answer as the client gets it: its body and headers."""

    def answer(self, body: bytes, prepared: Prepared) -> Answer:
        """A 2xx JSON answer for the client; raises ValueError when it is not a usable one."""

    def stream(self, prepared: Prepared) -> StreamReader: ...

    async def probe(self, account: AccountConfig) -> bool: ...

    def native_messages(self) -> NativeMessages | None:
        """This provider for clients of Anthropic's Messages API when its upstream speaks it (their
        bytes passed through, answers relayed as they come); None: their requests are converted
        to chat completions and served by this provider itself."""

    async def close(self) -> None: ...


class NativeMessages(Provider, Protocol):
    """A provider whose upstream speaks the Messages API, serving its clients as they are."""

    async def count_tokens(self, account: AccountConfig, prepared: Prepared, request_id: str) -> Exchange:
        """`POST /v1/messages/count_tokens` with a prepared count_tokens request."""
