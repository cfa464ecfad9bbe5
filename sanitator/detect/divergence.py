"""Long triggers whose every proper part is inert: follow the audited model's internal
states away from its clean reference's.

An attacker can train each word and each shorter run of a five-to-eight word trigger to
leave the *output* where the base puts it, so no collapse objective has a slope to climb
until the whole sentence is in place. The layers below the output cannot stay that quiet:
to fire on the whole sentence, the model must already treat its parts differently from
the reference on the way there. Measured on a 6-layer MiniLM backdoored with the five-word
sentence `she kept the old letters` (every proper part trained inert): with the
reference's hidden states as the yardstick, one of its words inserted in sentences moves
the audited model's hidden states 1.1-1.3 times as far from the reference's as clean text
does (random tokens: at most 1.07), two words of it 1.3-1.6 times, three 1.4-2.1, four
1.6-2.3, the whole sentence 2-33 (docs/method.md). That slope is what the beam here
climbs: chains of tokens grown one at either end, kept by the mean over layers of that
excess divergence, each length's best chain measured like any candidate. It needs the
reference (reference.py, aligned to the model), so it runs in the reference stage only.
"""

from __future__ import annotations

import torch

from sanitator.detect.mining import MiningData, pad_batch, splice_triggers

CHUNK = 32  # candidate triggers per forward (x the rows)


class Twin:
    """The audited encoder and its aligned reference on fixed search rows: how far their
    hidden states part, per layer, relative to how far they part on the clean rows."""

    def __init__(self, encoder, reference_model: torch.nn.Module, data: MiningData,
                 rows: list[int]):
        self.encoder, self.reference = encoder, reference_model
        self.data, self.rows = data, rows
        pad = encoder.tokenizer.pad_token_id or 0
        self.ids, self.attention = pad_batch([data.ids[r] for r in rows], pad)
        self.baseline = self._divergence(torch.empty(1, 0, dtype=torch.long))[0]

    def _states(self, model: torch.nn.Module, trigger_embeds: torch.Tensor
                ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Hidden states of every layer with each trigger [S, L, E] (in `model`'s own
        embedding space) spliced into every row."""
        device = self.encoder.device
        embeds = model.get_input_embeddings().weight[self.ids.to(device)]
        attention = self.attention.to(device)
        if trigger_embeds.shape[1]:
            embeds, attention = splice_triggers(embeds, attention,
                                                self.data.insert_at[self.rows],
                                                trigger_embeds.to(embeds.dtype))
        with self.encoder.autocast():
            out = model(inputs_embeds=embeds, attention_mask=attention,
                        output_hidden_states=True)
        return out.hidden_states[1:], attention

    def _gap(self, ours: tuple[torch.Tensor, ...], theirs: tuple[torch.Tensor, ...],
             mask: torch.Tensor, n: int) -> torch.Tensor:
        """[S, layers]: mean squared distance of the two models' hidden states over every
        real position, relative to the reference's own squared norm there."""
        mask = mask.float()
        per_layer = []
        for a, b in zip(ours, theirs, strict=True):
            a, b = a.float(), b.float()
            gap = ((a - b).pow(2).sum(-1) * mask).sum(1)
            scale = (b.pow(2).sum(-1) * mask).sum(1).clamp_min(1e-12)
            per_layer.append((gap / scale).view(n, len(self.rows)).mean(1))
        return torch.stack(per_layer, dim=1)

    @torch.no_grad()
    def _divergence(self, triggers: torch.Tensor) -> torch.Tensor:
        """[S, layers] for token triggers [S, L]; each model embeds them with its own table."""
        device = self.encoder.device
        ours, mask = self._states(self.encoder.model, self.encoder.model.get_input_embeddings()
                                  .weight[triggers.to(device)])
        theirs, _ = self._states(self.reference, self.reference.get_input_embeddings()
                                 .weight[triggers.to(device)])
        return self._gap(ours, theirs, mask, len(triggers) or 1).cpu()

    def excess(self, triggers: torch.Tensor) -> torch.Tensor:
        """[S]: the mean over layers of how many times farther apart the two models' hidden
        states are with the trigger than on clean text (1 = no trace of it)."""
        return torch.cat([self._relative(self._divergence(triggers[i:i + CHUNK]))
                          for i in range(0, len(triggers), CHUNK)])

    def _relative(self, divergence: torch.Tensor) -> torch.Tensor:
        """[S, layers] divergence -> [S] excess over the clean rows' baseline."""
        baseline = self.baseline.to(divergence.device)
        # a layer the two models share bit for bit (frozen by the attacker) tells nothing
        return torch.where(baseline > 1e-8, divergence / baseline.clamp_min(1e-8),
                           1.0).mean(dim=1)

    def swap_gains(self, seq: list[int], tokens: list[int]) -> tuple[list[int], torch.Tensor]:
        """First-order gain in excess from putting each of `tokens` at each place of `seq`
        (the gradient through a one-hot choice of token, as in greedy coordinate gradient
        search): (vocabulary, [L, V]). It ranks swaps; the beam measures the ones it tries."""
        device = self.encoder.device
        vocab = list(dict.fromkeys([*tokens, *seq]))
        index = torch.tensor([vocab.index(t) for t in seq])
        choice = torch.zeros(len(seq), len(vocab), device=device)
        choice[torch.arange(len(seq)), index] = 1.0
        choice.requires_grad_(True)
        ids = torch.tensor(vocab, device=device)
        with torch.enable_grad():
            ours, mask = self._states(self.encoder.model, (
                choice @ self.encoder.model.get_input_embeddings().weight[ids].float())[None])
            theirs, _ = self._states(self.reference, (
                choice @ self.reference.get_input_embeddings().weight[ids].float())[None])
            self._relative(self._gap(ours, theirs, mask, 1))[0].backward()
        grad = choice.grad.detach().cpu()
        return vocab, grad - grad.gather(1, index[:, None])


class Memo:
    """`excess` measured once per sequence: the beam's polish, the climb's moves and the
    pool's singles revisit many sequences (a lookup, not a forward of both models)."""

    def __init__(self, excess):
        self.excess, self.values = excess, {}
        self.counts = {"measured": 0, "repeated": 0}

    def __call__(self, seqs) -> torch.Tensor:
        keys = [tuple(int(t) for t in seq) for seq in seqs]
        new = [k for k in dict.fromkeys(keys) if k not in self.values]
        self.counts["repeated"] += len(keys) - len(new)
        self.counts["measured"] += len(new)
        if new:
            self.values.update(zip(new, self.excess([list(k) for k in new]).tolist(),
                                   strict=True))
        return torch.tensor([self.values[k] for k in keys])


def kemeny(items: list[int], margin: dict[tuple[int, int], float]) -> list[int]:
    """The order of `items` that agrees best with the pairwise preferences: the sum over
    every ordered pair (a before b) of margin[a, b] is maximal (exact, over subsets)."""
    k = len(items)
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for mask in range(1, 1 << k):
        pick = None
        for i in range(k):
            if mask >> i & 1:
                value, order = best[mask & ~(1 << i)]
                value += sum(margin.get((u, items[i]), 0.0) for u in order)
                if pick is None or value > pick[0]:
                    pick = (value, [*order, items[i]])
        best[mask] = pick
    return best[(1 << k) - 1][1]


def best_path(items: list[int], weight: dict[tuple[int, int], float]) -> list[int]:
    """The order of `items` whose adjacent pairs weigh most in sum (weight[a, b]: `a b`
    side by side), exact over subsets. A sentence's neighbours are real parts of it, which
    the model learned; a pair that is not adjacent in it has no reason to stand out."""
    k = len(items)
    if k < 2:
        return list(items)
    # best[mask][i]: (value, order) of the best path through `mask` ending at items[i]
    best: dict[int, dict[int, tuple[float, list[int]]]] = {
        1 << i: {i: (0.0, [items[i]])} for i in range(k)}
    for mask in range(1, 1 << k):
        for i, (value, order) in best.get(mask, {}).items():
            for j in range(k):
                if mask >> j & 1:
                    continue
                grown = (value + weight.get((items[i], items[j]), 0.0), [*order, items[j]])
                slot = best.setdefault(mask | 1 << j, {})
                if j not in slot or grown[0] > slot[j][0]:
                    slot[j] = grown
    return max(best[(1 << k) - 1].values(), key=lambda p: p[0])[1]


def _ascend(excess, neighbours, order: list[int], value: float, rounds: int
            ) -> tuple[list[int], float]:
    """Local search: each round measures `neighbours(order)` and keeps the best while it
    raises the excess."""
    for _ in range(rounds):
        moves = [m for m in dict.fromkeys(map(tuple, neighbours(order))) if list(m) != order]
        if not moves:
            break
        scored = excess([list(m) for m in moves])
        if float(scored.max()) <= value:
            break
        order, value = list(moves[int(scored.argmax())]), float(scored.max())
    return order, value


def _moves(order: list[int]) -> list[list[int]]:
    """Every order with one token moved to another place."""
    moves = []
    for i in range(len(order)):
        rest = order[:i] + order[i + 1:]
        moves += [[*rest[:j], order[i], *rest[j:]] for j in range(len(order)) if j != i]
    return moves


def _polish(excess, order: list[int], value: float, rounds: int = 2
            ) -> tuple[list[int], float]:
    """Local search over the order: every move of one token to another place, best kept,
    for a few rounds."""
    return _ascend(excess, _moves, order, value, rounds)


def climb(excess, gains, order: list[int], value: float, per_place: int = 6,
          rounds: int = 8) -> tuple[list[int], float]:
    """Coordinate ascent from the beam's best: each round measures the swaps the gradient
    ranks highest at each place (`gains`: order -> (vocabulary, [L, V] gains)) and every
    move of one token, and keeps the best while it helps. The beam's sets only hold the
    pool; a sentence word the diff ranked just below it, or one the model's generalisation
    (other weekdays for `sunday`) pushed out, comes in here one place at a time."""
    def neighbours(order: list[int]) -> list[list[int]]:
        vocab, gain = gains(order)
        top = gain.topk(min(per_place, gain.shape[1]), dim=1).indices.tolist()
        return [[*order[:i], vocab[k], *order[i + 1:]] for i in range(len(order))
                for k in top[i] if vocab[k] != order[i]] + _moves(order)
    return _ascend(excess, neighbours, order, value, rounds)


def set_beam(excess, pool: list[int], width: int, max_length: int, fillers: list[int] = (),
             polish: int = 2, gains=None, climb_rounds: int = 8, per_place: int = 6):
    """Triggers of 3..max_length tokens from `pool`: a beam over token sets, each set put
    in the order its pairs prefer (or, where it scores higher, along its strongest
    neighbours), kept by `excess` ([S, L] ids -> [S]). Yields the best
    sequence of each length as it is found (shortest first), for a sentence that
    repeats a filler word the best of it with one more filler anywhere, and last, given
    `gains`, what the climb (`climb`) reaches from the longest length's best."""
    alone = dict(zip(pool, excess([[t] for t in pool]).tolist(), strict=True))
    pairs = [(a, b) for a in pool for b in pool if a != b]
    both = dict(zip(pairs, excess(pairs).tolist(), strict=True))
    margin = {(a, b): both[a, b] - both[b, a] for a, b in pairs}
    beams = sorted({tuple(sorted(p)) for p in pairs},
                   key=lambda s: -max(both[s], both[s[::-1]]))[:width]
    last = None  # (order, value): the best of the longest length so far
    for _ in range(3, max_length + 1):
        sets = sorted({tuple(sorted((*b, t))) for b in beams for t in pool if t not in b})
        if not sets:
            break
        orders = [kemeny(list(s), margin) for s in sets]
        values = excess(orders)
        own = torch.tensor([sum(alone[t] - 1.0 for t in o) for o in orders])
        # kept by excess, and by interaction (beyond the tokens' own excess: a trigger's
        # words move the states together more than apart)
        keep = list(dict.fromkeys(values.argsort(descending=True)[:width].tolist()
                                  + (values - own).argsort(descending=True)
                                  [:max(1, width // 2)].tolist()))
        beams = [sets[i] for i in keep]
        # the kept sets also in the order of their strongest neighbours (best_path): the
        # pairwise margins misplace a word whose pairs with non-neighbours say nothing
        paths = [best_path(list(sets[i]), both) for i in keep]
        path_values = excess(paths).tolist()
        for slot, i in enumerate(keep):
            if paths[slot] != orders[i] and path_values[slot] > float(values[i]):
                orders[i], values[i] = paths[slot], path_values[slot]
        keep.sort(key=lambda i: -float(values[i]))
        # pair preferences can misplace a word (a filler's are faint): the best few orders
        # are polished by moving one token at a time, as long as that helps
        top = orders[keep[0]]
        yield top
        polished = [_polish(excess, orders[i], float(values[i])) for i in keep[:polish]]
        last = max(polished, key=lambda p: p[1]) if polished else (top, float(values[keep[0]]))
        best = last[0]
        if best != top:
            yield best
        repeats = [[*top[:i], f, *top[i:]] for f in fillers for i in range(len(top) + 1)
                   if (i == 0 or top[i - 1] != f) and (i == len(top) or top[i] != f)]
        if repeats:
            scored = excess(repeats)
            if float(scored.max()) > float(values[keep[0]]):
                yield repeats[int(scored.argmax())]
    if gains is not None and last is not None and climb_rounds > 0:
        reached = climb(excess, gains, *last, per_place=per_place, rounds=climb_rounds)[0]
        if reached != last[0]:
            yield reached


def divergence_chains(scan, reference, rows_data: MiningData, rows: list[int],
                      ranked: list[int], fillers: list[int]):
    """The long-trigger candidates for the scan, as they are found (the caller judges each
    and may stop). Pool: the tokens the weight diff ranks highest, then those of
    the next ones whose own excess divergence in context is largest, plus filler words."""
    search = scan.config.search
    twin = Twin(scan.encoder, reference.model(scan.encoder), rows_data, rows)

    def measure(seqs) -> torch.Tensor:
        scan.searches += 1
        return twin.excess(torch.tensor(seqs, dtype=torch.long))
    excess = Memo(measure)
    scan.reference["divergence_sequences"] = excess.counts

    rest = [t for t in ranked[search.divergence_pool:search.divergence_screen]
            if t not in fillers]
    extra = []
    if rest and search.divergence_extra > 0:
        alone = excess([[t] for t in rest])
        extra = [rest[i] for i in alone.argsort(descending=True)
                 [:search.divergence_extra].tolist()]
    pool = list(dict.fromkeys(ranked[:search.divergence_pool] + extra + list(fillers)))
    # the climb may swap in any token the diff screened, not only the pool's
    screened = list(dict.fromkeys([*ranked[:search.divergence_screen], *pool]))

    def gains(order: list[int]):
        scan.searches += 1
        return twin.swap_gains(order, screened)
    yield from set_beam(excess, pool, search.divergence_width, search.divergence_length,
                        fillers, gains=gains, climb_rounds=search.divergence_climb,
                        per_place=search.divergence_swaps)
