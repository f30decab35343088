"""Groups: pub/sub broadcast to reply channels, kept in the server process.

The channels era let a consumer add reply channels (by name) to named groups and send a reply
to a whole group, a chat server being the standard example. fulmen keeps one `Groups` registry
per `ConsumerMiddleware`, in memory: with `--workers N` each worker process has its own, and a
group reaches only the members served by the process that sends to it.

Only the reply channels of requests and connections being served can be members: each one is
registered while it is served and leaves every group when that ends, so groups never keep a
departed client. A group exists while it has members. A group message goes to each member in
turn through the member's own reply channel (its translator, and its outbox in the sync form),
so it keeps its place among the member's other replies and flow control applies; a member the
message cannot be sent to leaves its groups, and the others still get it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Iterator
from typing import Any, Protocol

from fulmen.consumers.formats import Reply

logger = logging.getLogger("fulmen.error")

_ACTIONS = frozenset(("add", "discard", "send"))


class Member(Protocol):
    """A reply channel, as a group member."""

    @property
    def name(self) -> str: ...

    def put(self, reply: Reply) -> Awaitable[None]:
        """Send `reply` as the member's own replies are sent; done once it is sent."""
        ...


class Groups:
    """The groups of one `ConsumerMiddleware`: used on the event loop thread only."""

    __slots__ = ("_groups", "_joined", "_served", "channel")

    def __init__(self) -> None:
        self._served: dict[str, Member] = {}  # the reply channels being served, by name
        self._groups: dict[str, dict[str, Member]] = {}  # members in the order they were added
        self._joined: dict[str, set[str]] = {}  # the groups of each member
        self.channel = GroupChannel(self)

    @contextlib.contextmanager
    def serving(self, member: Member) -> Iterator[None]:
        """While the request or connection of `member` is served, it may join groups."""
        self._served[member.name] = member
        try:
            yield
        finally:
            del self._served[member.name]
            self._leave_all(member.name)

    def add(self, group: str, name: str) -> None:
        """Add the reply channel `name` to `group`; a name not being served is ignored."""
        _check_names(group, name)
        member = self._served.get(name)
        if member is None:
            logger.debug("Not added to group %r: no reply channel %r is being served", group, name)
            return
        self._groups.setdefault(group, {})[name] = member
        self._joined.setdefault(name, set()).add(group)

    def discard(self, group: str, name: str) -> None:
        """Remove `name` from `group`, if it is a member."""
        _check_names(group, name)
        members = self._groups.get(group)
        if members is None or members.pop(name, None) is None:
            return
        if not members:
            del self._groups[group]
        joined = self._joined[name]
        joined.discard(group)
        if not joined:
            del self._joined[name]

    def joined(self, name: str) -> bool:
        """Whether the reply channel `name` is in a group."""
        return name in self._joined

    def snapshot(self) -> dict[str, list[str]]:
        """Each group with the names of its members, in the order they were added."""
        return {group: list(members) for group, members in self._groups.items()}

    async def send(self, group: str, reply: Reply) -> None:
        """Send `reply` to each member of `group` in turn, waiting until each has it."""
        for member in self._members(group, reply):
            try:
                await member.put(reply)
            except Exception as exc:
                self._drop(member.name, exc)

    def post(self, group: str, reply: Reply) -> None:
        """Queue `reply` for each member of `group` without waiting (sync form, on the loop).

        Each member's reply is queued before this returns, so it leaves before the replies
        queued after it; one that later fails to send makes that member leave its groups.
        """
        for member in self._members(group, reply):
            try:
                sent = asyncio.ensure_future(member.put(reply))
            except Exception as exc:
                self._drop(member.name, exc)
            else:
                sent.add_done_callback(functools.partial(self._sent, member.name))

    def _members(self, group: str, reply: Reply) -> list[Member]:
        _check_names(group)
        if not isinstance(reply, dict):
            raise TypeError(f"A group message is a dict, not {type(reply).__name__}")
        return list(self._groups.get(group, {}).values())

    def _sent(self, name: str, sent: asyncio.Future[None]) -> None:
        if not sent.cancelled() and (exc := sent.exception()) is not None:
            self._drop(name, exc)

    def _drop(self, name: str, exc: BaseException) -> None:
        logger.debug("Group message not sent to %s (%r): it leaves its groups", name, exc)
        self._leave_all(name)

    def _leave_all(self, name: str) -> None:
        for group in self._joined.pop(name, ()):
            members = self._groups[group]
            del members[name]
            if not members:
                del self._groups[group]


def _check_names(*names: object) -> None:
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"Group and reply channel names are str, not {type(name).__name__}")


class GroupChannel:
    """`channels['groups']` of the async form: `await channel.send(command)`, the command being
    `{'group': name, 'add': reply_channel_name}`, `{'group': name, 'discard':
    reply_channel_name}` or `{'group': name, 'send': reply}`."""

    __slots__ = ("_groups",)

    def __init__(self, groups: Groups) -> None:
        self._groups = groups

    async def send(self, command: dict[str, Any]) -> None:
        keys = set(command) - {"group"}
        if "group" not in command or len(keys) != 1 or not keys <= _ACTIONS:
            raise ValueError(
                "A groups message has 'group' and one of 'add', 'discard' or 'send', "
                f"not {list(command)}"
            )
        group = command["group"]
        if "send" in command:
            await self._groups.send(group, command["send"])
        elif "add" in command:
            self._groups.add(group, command["add"])
        else:
            self._groups.discard(group, command["discard"])
