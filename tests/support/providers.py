"""One adapter per provider, so a single conformance suite can drive every source.

Each adapter knows how to make its emulator, how to configure the relay's
source for it, how to make traffic and how to name what it generated the
same way it finds it again in delivered events.
"""

from __future__ import annotations

from typing import Any, Protocol

from relay.emulators.harness import BackgroundLoop
from relay.emulators.leancloud import LeanCloudEmulator
from relay.emulators.rongcloud import RongCloudEmulator, message_key
from relay.emulators.wukongim import ServerQuirks, WuKongIMEmulator


class ProviderAdapter(Protocol):
    name: str

    def emulator(self, seed: int) -> Any: ...

    def source(self, urls: list[str], **overrides: Any) -> dict[str, Any]: ...

    def generate(self, emulator: Any, count: int) -> set[str]: ...

    def key(self, event: dict[str, Any]) -> str: ...

    def wrong_credentials(self) -> dict[str, Any]: ...

    def redeliver(self, loop: BackgroundLoop, emulator: Any) -> int:
        """Make the provider send something it already sent; returns how many."""

    def data_requests(self, emulator: Any) -> int:
        """Requests that read (and so might consume or acknowledge) data."""

    def pending(self, emulator: Any) -> int:
        """Messages the provider still holds for the relay."""


class RongCloudAdapter:
    name = "rongcloud"

    def emulator(self, seed: int) -> RongCloudEmulator:
        return RongCloudEmulator("key", "secret-value", batch_size=50, budget=10, seed=seed)

    def source(self, urls: list[str], **overrides: Any) -> dict[str, Any]:
        return {"type": "rongcloud", "app_key": "key", "app_secret": "secret-value",
                "base_urls": urls, "idle_interval": "200ms", **overrides}

    def generate(self, emulator: RongCloudEmulator, count: int) -> set[str]:
        return set(emulator.generate(count))

    def key(self, event: dict[str, Any]) -> str:
        return message_key(event["native"])

    def wrong_credentials(self) -> dict[str, Any]:
        return {"app_secret": "not-the-secret"}

    def redeliver(self, loop: BackgroundLoop, emulator: RongCloudEmulator) -> int:
        emulator.redelivery_ratio = 0.3
        return 1

    def data_requests(self, emulator: RongCloudEmulator) -> int:
        return int(emulator.snapshot()["requests"])

    def pending(self, emulator: RongCloudEmulator) -> int:
        return sum(emulator.snapshot()["queued"].values())


class WuKongIMAdapter:
    name = "wukongim"

    def __init__(self, quirks: ServerQuirks | None = None) -> None:
        self.quirks = quirks  # None: the emulator's default

    def emulator(self, seed: int) -> WuKongIMEmulator:
        return WuKongIMEmulator("manager-token", uids=("u1", "u2"), channels=(("g1", 2),),
                                seed=seed, quirks=self.quirks)

    def source(self, urls: list[str], **overrides: Any) -> dict[str, Any]:
        return {"type": "wukongim", "base_url": urls[0], "token": "manager-token",
                "uids": ["u1", "u2"], "channels": [{"id": "g1", "type": 2}],
                "sync_limit": 100, "channel_limit": 100, "idle_interval": "200ms", **overrides}

    def generate(self, emulator: WuKongIMEmulator, count: int) -> set[str]:
        ids = {str(i) for i in emulator.generate(count - count // 3)}
        before = len(emulator.channels.get(("g1", 2)).messages) \
            if ("g1", 2) in emulator.channels else 0
        emulator.generate_channel(count // 3, "g1", 2)
        stored = emulator.channels[("g1", 2)].messages[before:]
        return ids | {str(s.message_id) for s in stored}

    def key(self, event: dict[str, Any]) -> str:
        return str(event["native"]["message_id"])

    def wrong_credentials(self) -> dict[str, Any]:
        return {"token": "not-the-token"}

    def redeliver(self, loop: BackgroundLoop, emulator: WuKongIMEmulator) -> int:
        emulator.restart()  # acks in progress forgotten: the last batches come back
        return 1

    def data_requests(self, emulator: WuKongIMEmulator) -> int:
        s = emulator.snapshot()
        return int(s["syncs"] + s["acks"] + s["channel_syncs"])

    def pending(self, emulator: WuKongIMEmulator) -> int:
        unacked = sum(len(emulator.unacked(uid)) for uid in ("u1", "u2"))
        return unacked


class LeanCloudAdapter:
    name = "leancloud"

    def emulator(self, seed: int) -> LeanCloudEmulator:
        return LeanCloudEmulator("app-id", "master-key-value", seed=seed)

    def source(self, urls: list[str], **overrides: Any) -> dict[str, Any]:
        return {"type": "leancloud", "base_url": urls[0], "app_id": "app-id",
                "master_key": "master-key-value", "settle_delay": "1s", "limit": 200,
                "idle_interval": "200ms", "requests_per_minute": 600, **overrides}

    def generate(self, emulator: LeanCloudEmulator, count: int) -> set[str]:
        return set(emulator.generate(count, age=2.0))

    def key(self, event: dict[str, Any]) -> str:
        return str(event["native"]["msg-id"])

    def wrong_credentials(self) -> dict[str, Any]:
        return {"master_key": "not-the-master-key"}

    def redeliver(self, loop: BackgroundLoop, emulator: LeanCloudEmulator) -> int:
        # The history shows a message a second time (same msg-id, later position).
        first = emulator.generated[-1]
        emulator.add_message(first["msg-id"], first["timestamp"] + 1, first.get("data", ""),
                             conv_id=first["conv-id"])
        return 1

    def data_requests(self, emulator: LeanCloudEmulator) -> int:
        return int(emulator.snapshot()["history_requests"])

    def pending(self, emulator: LeanCloudEmulator) -> int:
        return 0  # a history: nothing is consumed


ADAPTERS: list[ProviderAdapter] = [RongCloudAdapter(), WuKongIMAdapter(), LeanCloudAdapter()]
