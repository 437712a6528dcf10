"""The dispatcher: claims due deliveries, sends them, and has their outcomes recorded.

A slot is busy only while its send is: the outcome goes to the store's group
commit without waiting for it, and the lease keeps the delivery from being
claimed again until it is written (a crash before that means a resend, which
receivers deduplicate). Claims wait until half the slots are free, because a
transaction costs about the same for one row as for a hundred. Each subscriber
may hold only so many of the slots (``publisher.slots``): one that is slow to
answer cannot take them all, and a claim skips its due deliveries for others'.

Before it guesses, it asks: an attempt whose outcome is uncertain, a resend
after such an attempt, and the last attempt of a schedule are each followed or
preceded by a status question to the subscriber (GetStatus, or the HTTP status
URL). If the subscriber already has the event, the delivery is confirmed
instead of sent again or dead-lettered.

In the embedded mode the dispatcher leases further ahead than it sends
(``EMBEDDED_DEPTH`` leases per slot): an emit leases its new deliveries in its
own insert, where a claim must read each event back and rewrite its row, and
the deliveries leased beyond the free slots wait here, per subscriber, for the
next of that subscriber's sends to end. A lease lasts long enough for the
longest such wait. With several replicas (PostgreSQL) it leases only what it
sends, so that the others get their share.

It sleeps until the store says there is new work (an Emit committed, an outcome
scheduled a retry) or the earliest pending delivery comes due, so the happy
path has no poll interval. A slot freed by a finished send makes it claim only
if something may be due: at low load every delivery frees a slot, and a claim
that finds nothing is a transaction for nothing. Sends run concurrently up to
``max_in_flight``; each outcome goes through the pure retry policy and then
back to the store, which writes it only if this process still holds the
delivery's lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping

from common import log, signing
from publisher import model, retry
from publisher import transport as tx
from publisher.slots import Grant, Slots
from publisher.store import AttemptRecord, Store, sweeper_of

logger = logging.getLogger("publisher.dispatcher")

# Even with nothing due, look again this often: another replica may have left
# work behind, or a clock may have jumped.
IDLE_POLL_SECONDS = 1.0
# A lease outlives the longest an attempt may take (see attempt_budget) by this much (or
# by twice the deadline, if that is shorter) before the delivery may be claimed again:
# time to record the outcome.
LEASE_MARGIN_SECONDS = 10.0
# Deliveries in doubt asked about per reconciliation sweep.
RECONCILE_BATCH = 100
# Leases per send slot in the embedded mode: one sending, the rest waiting for it. In
# e2e_http (6,000 events in EmitBatch calls of 500, to one subscriber) claims took the
# store's thread 28 µs of CPU per delivery, and at 1 lease per slot most deliveries were
# claimed; see README, Benchmarks.
EMBEDDED_DEPTH = 8


class Dispatcher:
    def __init__(
        self,
        store: Store,
        transports: Mapping[model.Protocol, tx.Transport],
        *,
        owner: str,
        issuer: str,
        delivery_timeout: float,
        max_in_flight: int,
        max_in_flight_per_subscriber: int,
        claim_batch: int,
        depth: int = 1,
        now: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._transports = transports
        self._owner = owner
        self._sweeper = sweeper_of(owner)
        self._issuer = issuer
        self._timeout = delivery_timeout
        # See attempt_budget; read for every send.
        self._attempt_budget = delivery_timeout + 2 * min(
            delivery_timeout, tx.STATUS_TIMEOUT_SECONDS
        )
        # Leases, ``depth`` per send slot.
        self._slots = Slots(max_in_flight, max_in_flight_per_subscriber, depth)
        # Sends in flight, in all and per subscriber, within the slots' limits; and the
        # leased deliveries waiting for a slot, per subscriber, oldest first.
        self._sending = 0
        self._sending_to: Counter[str] = Counter()
        self._waiting: dict[str, deque[model.Claim]] = {}
        # The send limit of each subscriber with deliveries waiting, as they were leased.
        self._send_limits: dict[str, int] = {}
        self._filling = False
        # Waiting deliveries being given back (see forget).
        self._giving_back: set[asyncio.Task[None]] = set()
        self._claim_batch = claim_batch
        self._now = now
        self._jitter = jitter
        self._wakeup = asyncio.Event()
        # Sends in flight, each with the loop time its attempt budget runs out, in the
        # order they started (and so of their budgets); see _watch.
        self._in_flight: dict[asyncio.Task[None], float] = {}
        # Sends the watch cancelled for overrunning their budget, not for a stop.
        self._overran: set[asyncio.Task[None]] = set()
        self._watch_timer: asyncio.TimerHandle | None = None
        # Outcomes decided in this turn of the event loop, handed to the store together at
        # its end (see _hand_over).
        self._outcomes: list[AttemptRecord] = []
        # Hand-overs to the store not yet committed, each with its number of outcomes, and
        # those numbers' sum (kept, as _room reads it after every send); bounded for
        # back-pressure.
        self._unrecorded: dict[asyncio.Future[list[None]], int] = {}
        self._unrecorded_count = 0
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        # Whether a claim now may find work: new work and a claim that came back full say
        # so. A claim that came back short says when the next delivery is due instead.
        self._maybe_due = True
        self._next_due = 0.0

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def attempt_budget(self) -> float:
        """The longest one attempt may take: a resend asks first, sends, and may ask again.

        Each step has its own deadline; this bounds their sum too (see _deliver).
        """
        return self._attempt_budget

    @property
    def lease_seconds(self) -> float:
        # Longer than the attempt, or the lease would run out while it is still in flight:
        # the delivery would be claimed and sent again, and this outcome fenced off. A
        # delivery leased ahead waits for at most depth - 1 attempts before its own.
        margin = min(LEASE_MARGIN_SECONDS, 2 * self._timeout)
        return self._slots.depth * self.attempt_budget + margin

    def wake(self) -> None:
        """New work: deliveries may be due now."""
        self._maybe_due = True
        self._wakeup.set()

    def grant(self, wanted: int) -> Grant:
        """Holds free slots for deliveries an emit is about to lease to this dispatcher."""
        return self._slots.grant(0 if self._stopping else wanted)

    def take(self, claims: list[model.Claim], grant: Grant) -> None:
        """Starts deliveries an emit leased to us, in the leases ``grant`` held for them.

        In the embedded mode this skips the claim round trip between an Emit and
        its first send; the lease was written in the emit's own transaction.
        """
        self._slots.settle(grant)
        for claim in claims:
            self._start(claim)
        if grant.total > len(claims):
            self._wakeup.set()  # Unused slots are free again.

    def forget(self, subscriber_id: str) -> None:
        """The subscriber changed (paused, edited, disabled, deleted): what waits for it was
        leased with what it was, so it goes back, to be claimed as the subscriber is now.

        Its sends in flight go on, as they did before it changed.
        """
        waiting = self._waiting.pop(subscriber_id, None)
        if not waiting:
            return
        del self._send_limits[subscriber_id]
        for _ in waiting:
            self._slots.release(subscriber_id)
        task = asyncio.create_task(self._store.give_back(self._owner, list(waiting)))
        self._giving_back.add(task)
        task.add_done_callback(self._given_back)

    def _given_back(self, task: asyncio.Task[None]) -> None:
        self._giving_back.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Their leases run out and they come due again: nothing is lost.
            logger.error("giving back leases failed: %r", task.exception())
        self.wake()  # Given back, they are due now.

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="dispatcher")

    async def stop(self, grace: float) -> None:
        """Takes no new work, lets sends in flight finish within ``grace`` s, releases the rest."""
        self._stopping = True
        self.wake()
        if self._loop_task is not None:
            await self._loop_task
        if self._in_flight:
            _, late = await asyncio.wait(list(self._in_flight), timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._watch_timer is not None:
            self._watch_timer.cancel()
            self._watch_timer = None
        self._hand_over()
        await asyncio.gather(*self._unrecorded, return_exceptions=True)
        # What waited for a slot was never attempted: its attempt is taken back too.
        for subscriber_id in list(self._waiting):
            self.forget(subscriber_id)
        await asyncio.gather(*self._giving_back, return_exceptions=True)
        released = await self._store.release(self._owner)
        if released:
            log.event(logger, "leases_released", count=released)

    def _room(self) -> int:
        """How many deliveries to claim now; 0 until enough leases are free to be worth it."""
        if self._unrecorded_count + len(self._outcomes) >= 2 * self._slots.total:
            return 0  # The database is behind: let it catch up before sending more.
        room = self._slots.free()
        worth_it = min(self._claim_batch, max(1, self._slots.capacity // 2))
        if self._slots.leased and room < worth_it:
            return 0
        return min(room, self._claim_batch)

    async def _run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            wanted = self._room()
            if not wanted:
                # A finished send or a committed outcome wakes us.
                await self._sleep(IDLE_POLL_SECONDS)
                continue
            if not self._maybe_due and self._now() < self._next_due:
                # Slots are free but nothing is due before _next_due, unless new work wakes us.
                await self._sleep(self._next_due - self._now())
                continue
            # Cleared before the claim, so that new work arriving during it is not missed.
            self._maybe_due = False
            grant = self._slots.grant(wanted)
            try:
                claims, due, turned_away = await self._store.claim_round(
                    self._owner, grant, self.lease_seconds
                )
            except Exception:
                logger.exception("claim failed")
                claims, due, turned_away = [], None, frozenset()
            finally:
                self._slots.settle(grant)
            for claim in claims:
                self._start(claim)
            for subscriber_id in turned_away:
                self._slots.turned_away(subscriber_id)
            # A subscriber turned away for want of room that is not full now had half its
            # sends finish during the claim: its due deliveries can be claimed at once. One
            # that is full makes the loop claim when it drains (see _finished).
            if len(claims) == wanted or any(not self._slots.is_full(s) for s in turned_away):
                self._maybe_due = True
                continue
            # Nothing more is due now: not before the next one is, and look again within
            # the idle poll (another replica may have left work behind, or a clock jumped).
            now = self._now()
            self._next_due = (
                now + IDLE_POLL_SECONDS if due is None else min(due, now + IDLE_POLL_SECONDS)
            )
            await self._sleep(self._next_due - now)

    def _start(self, claim: model.Claim) -> None:
        """A delivery leased to us: sent now if a slot is free, else when one is."""
        subscriber_id = claim.subscriber.id
        own = claim.subscriber.spec.max_in_flight
        self._slots.acquire(subscriber_id, own)
        waiting = self._waiting.get(subscriber_id)
        if waiting is not None:
            waiting.append(claim)
            return
        limit = self._slots.send_limit(own)
        if self._sending < self._slots.total and self._sending_to[subscriber_id] < limit:
            self._send(claim)
        else:
            self._waiting[subscriber_id] = deque((claim,))
            self._send_limits[subscriber_id] = limit

    def _send_waiting(self) -> None:
        """Sends ended in this turn of the event loop: each freed slot goes to the first
        subscriber in turn with a delivery waiting and a slot of its own free (its oldest
        delivery), and that subscriber goes to the back of the turn.

        In turn, not to the subscriber whose send ended: with every slot of the total
        busy, the subscribers that leased ahead would otherwise keep them all, and one
        with a single delivery waiting would wait for all of theirs.
        """
        self._filling = False
        waiting_for, limits, sending_to = self._waiting, self._send_limits, self._sending_to
        # stop() gives back what still waits.
        while not self._stopping and self._sending < self._slots.total:
            for subscriber_id in waiting_for:
                if sending_to[subscriber_id] < limits[subscriber_id]:
                    break
            else:
                return
            waiting = waiting_for.pop(subscriber_id)
            self._send(waiting.popleft())
            if waiting:
                waiting_for[subscriber_id] = waiting
            else:
                del limits[subscriber_id]

    def _send(self, claim: model.Claim) -> None:
        subscriber_id = claim.subscriber.id
        self._sending += 1
        self._sending_to[subscriber_id] += 1
        task = asyncio.create_task(self._deliver(claim))
        loop = asyncio.get_running_loop()
        self._in_flight[task] = loop.time() + self._attempt_budget
        task.add_done_callback(lambda done: self._finished(done, subscriber_id))
        if self._watch_timer is None:
            self._watch_timer = loop.call_at(self._in_flight[task], self._watch)

    def _watch(self) -> None:
        """Cancels the sends that overran their attempt budget (see _deliver), and sets
        itself for the next budget to run out.

        A transport keeps its own deadlines, so this only catches one that does not.
        One timer for all sends, set for the oldest: an asyncio.timeout around each
        send cost the event loop 10.7 µs per send under uvloop, against 5.3 for the
        same block without a deadline, and sends in flight end in about the order they
        started.
        """
        self._watch_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, budget_ends in self._in_flight.items():
            if budget_ends > now:
                self._watch_timer = loop.call_at(budget_ends, self._watch)
                return
            if task not in self._overran:
                self._overran.add(task)
                task.cancel()

    async def _sleep(self, seconds: float) -> None:
        """Until ``seconds`` pass or something wakes the dispatcher."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), seconds)

    def _finished(self, task: asyncio.Task[None], subscriber_id: str) -> None:
        del self._in_flight[task]
        self._overran.discard(task)
        self._sending -= 1
        left = self._sending_to[subscriber_id] - 1
        if left:
            self._sending_to[subscriber_id] = left
        else:
            del self._sending_to[subscriber_id]
        if self._waiting and not self._filling:
            # Together, once this turn's sends have ended.
            self._filling = True
            asyncio.get_running_loop().call_soon(self._send_waiting)
        if self._slots.release(subscriber_id):
            # No longer full: the subscriber's deliveries that claims skipped may be due.
            self._maybe_due = True
        # A free slot may let the loop claim more.
        self._wakeup.set()

    async def reconcile_once(self) -> None:
        """The sweep: asks subscribers about deliveries whose last attempt was uncertain.

        Those that arrived are confirmed now instead of at their next retry,
        possibly hours away; the others go back to their scheduled time. It
        sends nothing and spends no attempt. What it holds is held under the
        sweeper's name (store.sweeper_of), and given back at its scheduled time
        if the sweep is stopped or fails before it has an answer.
        """
        doubtful = await self._store.claim_doubtful(
            self._sweeper, RECONCILE_BATCH, self.lease_seconds
        )
        if not doubtful:
            return
        settled = False
        try:
            receipts = await asyncio.gather(*(self._receipt(claim) for claim, _ in doubtful))
            now = self._now()
            confirmed = [
                self._decide(claim, _confirmed("reconciliation sweep"), now, 0.0, self._sweeper)
                for (claim, _), receipt in zip(doubtful, receipts, strict=True)
                if receipt == tx.Receipt.HAS_IT
            ]
            unconfirmed = [
                (claim, when)
                for (claim, when), receipt in zip(doubtful, receipts, strict=True)
                if receipt != tx.Receipt.HAS_IT
            ]
            if confirmed:
                await self._store.record(confirmed)
                log.event(logger, "reconciled", confirmed=len(confirmed))
            settled = True
        finally:
            if not settled:
                # Stopped or failed before the answers were written: every one goes back
                # to its scheduled time (a confirmation that did commit is fenced off).
                unconfirmed = doubtful
            if unconfirmed:
                await self._store.release_unconfirmed(unconfirmed, self._sweeper)
        # Given back at their scheduled times, some of which may have passed.
        self.wake()

    async def _receipt(self, claim: model.Claim) -> tx.Receipt:
        """The subscriber's answer about ``claim``'s event; unanswered if it cannot be asked.

        One delivery whose question cannot even be prepared (a secret that cannot sign)
        must not fail the whole sweep and leave every delivery in it leased.
        """
        try:
            attempt = self._attempt_for(claim)
        except Exception:
            logger.exception("status question could not be prepared")
            return tx.Receipt.UNANSWERED
        return await self._transports[claim.subscriber.spec.protocol].status(attempt)

    def _attempt_for(self, claim: model.Claim) -> tx.Attempt:
        subscriber = claim.subscriber
        return tx.Attempt(
            delivery_id=claim.delivery_id,
            attempt=claim.attempt,
            event_id=claim.event.id,
            event_type=claim.event.type,
            payload=claim.event.payload,
            content_type=claim.event.content_type,
            created_at=claim.event.created_at,
            subscriber_id=subscriber.id,
            endpoint=subscriber.spec.endpoint,
            body_format=subscriber.spec.body_format.value,
            keys=tuple(signing.secret_key(s) for s in subscriber.signing_secrets(self._now())),
            issuer=self._issuer,
            timeout=self._timeout,
            status_url=subscriber.spec.status_url,
        )

    async def _deliver(self, claim: model.Claim) -> None:
        started = self._now()
        clock = time.monotonic()
        try:
            attempt = self._attempt_for(claim)
            transport = self._transports[claim.subscriber.spec.protocol]
            result = await self._attempt(transport, attempt, claim)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task not in self._overran:
                raise  # A stop.
            assert task is not None
            task.uncancel()
            # A transport that overran its own deadlines (see _watch): the outcome is
            # recorded while the lease still holds, as uncertain, since the send may have
            # gone out.
            result = tx.Result(
                tx.Outcome.UNCERTAIN,
                error=f"no outcome within the attempt's budget of {self.attempt_budget:g}s",
            )
        except Exception as error:
            # A bug here (or a secret that cannot sign) fails the attempt on the schedule;
            # escaping, it would leave the delivery leased, to fail the same way each lease.
            logger.exception("attempt raised")
            result = tx.Result(tx.Outcome.FAILED, error=tx.excerpt(f"internal error: {error!r}"))
        if not self._outcomes:
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._outcomes.append(self._decide(claim, result, started, time.monotonic() - clock))

    def _hand_over(self) -> None:
        """Hands the outcomes of this turn of the event loop to the store in one submission.

        A submission of its own for each outcome cost the event loop about 5 µs per
        outcome in the group commit's futures and callbacks; sends end many to a turn
        under load. If the write fails, it fails for all of them alike, and their
        leases run out as one outcome's would.
        """
        if not self._outcomes:
            return
        outcomes, self._outcomes = self._outcomes, []
        pending = self._store.record_soon(outcomes)
        self._unrecorded[pending] = len(outcomes)
        self._unrecorded_count += len(outcomes)
        pending.add_done_callback(self._recorded)

    def _recorded(self, pending: asyncio.Future[list[None]]) -> None:
        self._unrecorded_count -= self._unrecorded.pop(pending)
        if not pending.cancelled() and pending.exception() is not None:
            # The lease runs out and the delivery comes due again: nothing is lost.
            logger.error("recording outcomes failed: %r", pending.exception())
        self._wakeup.set()

    async def _attempt(
        self, transport: tx.Transport, attempt: tx.Attempt, claim: model.Claim
    ) -> tx.Result:
        """Sends, asking the subscriber first or afterwards where guessing could be wrong."""
        resend = claim.last_outcome == tx.Outcome.UNCERTAIN.value
        if resend and await transport.status(attempt) == tx.Receipt.HAS_IT:
            return _confirmed("the previous attempt had arrived")
        result = await transport.send(attempt)
        if result.outcome == tx.Outcome.DELIVERED:
            return result
        schedule = claim.subscriber.spec.retry_schedule or retry.DEFAULT_SCHEDULE
        in_doubt = result.outcome == tx.Outcome.UNCERTAIN
        last = retry.is_last(schedule, claim.attempts_in_round)
        if (in_doubt or last) and await transport.status(attempt) == tx.Receipt.HAS_IT:
            return _confirmed(result.error, result.status_code)
        return result

    def _decide(
        self,
        claim: model.Claim,
        result: tx.Result,
        started: float,
        duration: float,
        owner: str = "",
    ) -> AttemptRecord:
        """Turns a transport result into the delivery's next state (pure but for the clock)."""
        now = self._now()
        error = result.error
        if result.outcome in (tx.Outcome.DELIVERED, tx.Outcome.CONFIRMED):
            state, next_at = model.DeliveryState.DELIVERED, now
        else:
            schedule = claim.subscriber.spec.retry_schedule or retry.DEFAULT_SCHEDULE
            when = retry.next_attempt_at(
                schedule,
                attempts_in_round=claim.attempts_in_round,
                round_started_at=claim.round_started_at,
                now=now,
                jitter=self._jitter(),
                retry_after=result.retry_after,
            )
            if when is None:
                state, next_at = model.DeliveryState.FAILED, now
                log.event(
                    logger,
                    "delivery_failed",
                    logging.WARNING,
                    delivery_id=claim.delivery_id,
                    event_id=claim.event.id,
                    subscriber_id=claim.subscriber.id,
                    attempts=claim.attempt,
                    error=error,
                )
            else:
                state, next_at = model.DeliveryState.PENDING, when
        disable_reason = ""
        if result.gone:
            disable_reason = f"the endpoint answered 410 Gone at {time.ctime(now)}"
            log.event(
                logger, "subscriber_disabled", logging.WARNING, subscriber_id=claim.subscriber.id
            )
        return AttemptRecord(
            delivery_id=claim.delivery_id,
            attempt=claim.attempt,
            owner=owner or self._owner,
            started_at=started,
            duration=duration,
            outcome=result.outcome.value,
            status_code=result.status_code,
            error=error,
            new_state=state,
            next_attempt_at=next_at,
            disable_reason=disable_reason,
            subscriber_id=claim.subscriber.id,
        )


def _confirmed(after: str, status_code: int = 0) -> tx.Result:
    return tx.Result(
        tx.Outcome.CONFIRMED,
        status_code=status_code,
        error=tx.excerpt(f"confirmed by status: the subscriber has the event ({after})"),
    )
