"""The whole training step as one replayable unit (train.py --whole-step): the twin of loop.train_step,
with the batch, augmentation, forward, loss, backward, the optimizer update and the schedule on the
device, so that on CUDA a captured CUDA graph replays STEPS_PER_GRAPH steps at a time with no host
work in between. explain() says where its time goes.
"""
import argparse
import contextlib
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import models
from errors import UserError
from loop import SYNC_EVERY, check_finite

STEPS_PER_GRAPH = SYNC_EVERY  # steps one CUDA graph replays: one replay between two reads of the losses
WARM_UP_STEPS = 3              # eager steps before the first capture (then undone), as CUDA graphs require


# ------------------------------------------------------------------------ the schedule

class Schedule:
    """The learning rate and momentum (None without) of every step of a run, as the recipe's own
    torch.optim scheduler sets them: it runs on a stand-in optimizer (the figures are torch's, not a
    copy of its formulas), one epoch at a time as they are asked for, so a long schedule (bench
    builds 1000 epochs) costs only the epochs used."""

    def __init__(self, recipe, epochs, steps, lr=None):
        self.stand_in = models.build_optimizer(recipe, torch.nn.Linear(1, 1), lr)
        self.scheduler, self.every = models.build_schedule(recipe, self.stand_in, epochs, steps, lr)
        self.stand_in.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        self.epochs, self.steps, self.rows = epochs, steps, []

    def epoch(self, epoch):
        """(learning rates, momentums) of the steps of epoch `epoch` (1-based)."""
        if not 1 <= epoch <= self.epochs:
            raise ValueError(f"epoch {epoch} is outside the schedule's 1-{self.epochs}")
        group = self.stand_in.param_groups[0]
        while len(self.rows) < epoch:
            lrs, moms = [], []
            for _ in range(self.steps):
                lrs.append(float(group["lr"]))
                moms.append(group.get("momentum"))
                if self.scheduler is not None and self.every == "batch":
                    self.scheduler.step()
            if self.scheduler is not None and self.every == "epoch":
                self.scheduler.step()
            self.rows.append((lrs, moms))
        return self.rows[epoch - 1]


def schedule_table(recipe, epochs, steps, lr=None):
    """(learning rates, momentums) of all the steps of a run, in order (Schedule, every epoch)."""
    s = Schedule(recipe, epochs, steps, lr)
    rows = [s.epoch(e) for e in range(1, epochs + 1)]
    return [x for lrs, _ in rows for x in lrs], [m for _, moms in rows for m in moms]


# ------------------------------------------------------------------ the written-out update

class Update:
    """The recipe's torch.optim update written out with foreach ops, reading the learning rate and
    momentum from 0-d device tensors: torch's own step reads a tensor lr back to the host (eager) or
    bakes the momentum in at capture (fused), and neither replays in a CUDA graph. The state (SGD's
    momentum buffers, Adagrad's sums) is the optimizer's own `state`, held in tensors this object
    keeps (adopt_state puts them back after optimizer.load_state_dict), so last.pt saves it and
    --resume restores it as train.py always did. SGD: momentum, weight decay (no dampening or
    Nesterov); Adagrad: weight decay, eps (no lr decay, zero initial sums): what the recipes use."""

    KEYS = {"SGD": "momentum_buffer", "Adagrad": "sum"}

    def __init__(self, optimizer):
        kind, (group,) = type(optimizer).__name__, optimizer.param_groups
        required = dict(SGD=dict(dampening=0, nesterov=False, maximize=False),
                        Adagrad=dict(lr_decay=0, initial_accumulator_value=0, maximize=False)).get(kind)
        if required is None or any(group.get(k, v) != v for k, v in required.items()):
            raise UserError(f"--whole-step writes out SGD and Adagrad as the recipes use them ({required}), "
                            f"not this {kind}")
        self.optimizer, self.kind, self.key = optimizer, kind, self.KEYS[kind]
        self.params, self.weight_decay, self.eps = list(group["params"]), group["weight_decay"], group.get("eps")
        self.own = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.adopt_state()

    def adopt_state(self):
        """The optimizer's state values (new tensors after load_state_dict) copied into the tensors the
        update works on, which become the optimizer's state again: a captured graph keeps its addresses."""
        for p, own in zip(self.params, self.own):
            state = self.optimizer.state[p]
            if state.get(self.key) is not None and state[self.key] is not own:
                own.copy_(state[self.key])
            state[self.key] = own

    @torch.no_grad()
    def __call__(self, grads, lr, momentum=None):
        """One update of the parameters by `grads`, with `lr` and `momentum` 0-d tensors."""
        params = self.params
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.kind == "SGD":  # buf = momentum * buf + g (buf starts at zero: the first is g, as torch's clone)
            torch._foreach_mul_(self.own, momentum)
            torch._foreach_add_(self.own, grads)
            torch._foreach_sub_(params, torch._foreach_mul(self.own, lr))
        else:                   # sum += g * g; p -= lr * g / (sqrt(sum) + eps)
            torch._foreach_addcmul_(self.own, grads, grads)
            std = torch._foreach_add(torch._foreach_sqrt(self.own), self.eps)
            torch._foreach_addcdiv_(params, torch._foreach_mul(grads, lr), std, value=-1)

    def finish_epoch(self, lr, momentum, steps):
        """The host-side bookkeeping of `steps` steps, the last with `lr` and `momentum`: the group
        holds them (as plain numbers, as torch's optimizer does) and Adagrad counts the steps."""
        group = self.optimizer.param_groups[0]
        group["lr"] = lr
        if momentum is not None:
            group["momentum"] = momentum
        for p in self.params if self.kind == "Adagrad" else []:
            self.optimizer.state[p]["step"] += steps


# ---------------------------------------------------------------------- the whole step

class WholeStep:
    """The whole training step of a recipe as one replayable unit (train.py --whole-step). Each step
    gathers its batch from the device-resident training set by a device step counter `t` (the
    epoch's shuffle and augmentation numbers are drawn once per epoch into fixed tensors), augments
    it, runs forward and loss (torch.compile'd or not: `compile`), backward, and the
    written-out update (Update) with the lr and momentum read from device tables of the recipe's own
    schedule; the loss and hit count go into fixed tensors. On CUDA (cudagraphs=True) the steps are
    captured with torch.cuda.CUDAGraph, STEPS_PER_GRAPH to a graph (one more for a shorter
    remainder), after WARM_UP_STEPS eager steps on a side stream that are then undone; an epoch is
    then its graphs' replays and a read of the losses between them. Elsewhere the same step() runs
    eagerly, one call a step. Static shapes: an epoch is len // batch_size full batches of a fresh
    shuffle (the short last batch is dropped) and the figures count the images trained on.
    compile: torch.compile forward and loss (inductor). Off by default: a graph replays eager
    kernels without the host, so compiling buys only fewer, fused kernels, at the price of a cold
    compile (--compile's first gap10k epoch took 44 s on an H100, more than a whole run needs), and on the CPU inductor's
    kernels were slower than eager ones (BENCHMARKS.md). `python whole_step.py` measures both."""

    def __init__(self, model, recipe, images, labels, batch_size, epochs, lr=None, amp=False, cudagraphs=True,
                 compile=False):
        dev = self.device = images.device
        self.model, self.aug, self.batch_size, self.amp = model, recipe["augment"], batch_size, amp
        self.images, self.labels = images, labels
        self.steps = len(labels) // batch_size
        if self.steps == 0:
            raise UserError(f"--whole-step needs at least one full batch of {batch_size} images, got {len(labels)}")
        self.optimizer = models.build_optimizer(recipe, model, lr)
        self.update = Update(self.optimizer)
        self.schedule = Schedule(recipe, epochs, self.steps, lr)
        self.lrs = torch.zeros(self.steps, device=dev)     # this epoch's lr and momentum of each step
        self.moms = torch.zeros(self.steps, device=dev)
        self.order = torch.zeros(self.steps, batch_size, dtype=torch.int64, device=dev)
        probe = data.draw(batch_size, self.aug, None)  # the draws' names and shapes, refilled every epoch
        self.draws = {k: torch.zeros(self.steps, *v.shape, dtype=v.dtype, device=dev) for k, v in probe.items()}
        self.t = torch.zeros((), dtype=torch.int64, device=dev)  # the step within the epoch
        self.slots = torch.arange(self.steps, device=dev)
        self.losses = torch.zeros(self.steps, device=dev)
        self.hits = torch.zeros((), dtype=torch.int64, device=dev)
        self.graphs = {} if cudagraphs and dev.type == "cuda" else None  # steps -> torch.cuda.CUDAGraph
        self.compiled, self.forward = compile, self.loss_and_hits
        if compile:
            self.forward = models.compile_model(self.loss_and_hits, False, dev, dynamic=False)
        self.counts = dynamo_counts()  # explain's starting point
        self.pool, self.side, self.compile_s, self.capture_s = None, None, None, 0.0

    def adopt_optimizer_state(self):
        """After optimizer.load_state_dict (train.py --resume): the loaded state into the step's own tensors."""
        self.update.adopt_state()

    def lr(self, epoch):
        """The learning rate of epoch `epoch`'s first step (what metrics.csv records)."""
        return self.schedule.epoch(epoch)[0][0]

    def loss_and_hits(self):
        """Step t's batch, augmented, through the model: (mean NLL loss, correct predictions)."""
        t = self.t.view(1)
        idx = self.order.index_select(0, t).view(-1)
        x = data.to_unit(self.images[idx])
        if self.aug:
            x = data.apply(x, self.aug, {k: v.index_select(0, t)[0] for k, v in self.draws.items()})
        x = (x - data.MEAN) / data.STD
        y = self.labels[idx]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            out = self.model(x)
        loss = F.nll_loss(out.float(), y)
        return loss, (out.detach().argmax(1) == y).sum()

    def step(self):
        """One training step, on device tensors alone (no host read, no value from the host): what a
        CUDA graph captures. Only parameters, buffers and the fixed tensors above are written."""
        loss, hits = self.forward()
        self.losses.copy_(torch.where(self.slots == self.t, loss.detach(), self.losses))
        self.hits.add_(hits)
        loss.backward()
        t = self.t.view(1)
        self.update([p.grad for p in self.update.params], self.lrs.index_select(0, t).view(()),
                    self.moms.index_select(0, t).view(()))
        for p in self.update.params:
            p.grad = None
        self.t.add_(1)

    def begin(self, gen, epoch):
        """Set up epoch `epoch` (1-based: its place in the schedule): a fresh shuffle and augmentation
        numbers from `gen`, the epoch's lr and momentum, step 0, no hits."""
        n = self.steps * self.batch_size
        order = torch.randperm(len(self.labels), generator=gen, device=gen.device)[:n]
        self.order.copy_(order.view(self.steps, self.batch_size))
        for k, v in data.draw(n, self.aug, gen).items():
            self.draws[k].copy_(v.view(self.steps, self.batch_size, *v.shape[1:]))
        lrs, moms = self.schedule.epoch(epoch)
        self.lrs.copy_(torch.tensor(lrs))
        self.moms.copy_(torch.tensor([m or 0.0 for m in moms]))
        self.t.zero_()
        self.hits.zero_()
        self.model.train()

    def run(self, steps):
        """`steps` steps from the current one: a graph's replay where there are graphs, else step() calls."""
        if self.graphs is None:
            for _ in range(steps):
                self.step()
            return
        if steps not in self.graphs:
            self.capture(steps)
        self.graphs[steps].replay()

    def epoch(self, gen, epoch, steps=None, progress=True):
        """Train epoch `epoch` (1-based: its place in the schedule), or its first `steps` steps.
        Returns (mean loss, accuracy %, images) like loop.train_epoch; a non-finite loss raises Diverged."""
        steps = min(steps or self.steps, self.steps)
        self.begin(gen, epoch)
        done = checked = 0
        with tqdm(total=steps, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True) as bar:
            while done < steps:
                k = min(STEPS_PER_GRAPH, steps - done)
                self.run(k)
                done += k
                bar.update(k)
                if done - checked >= SYNC_EVERY or done == steps:
                    check_finite(self.losses[checked:done].cpu().double(), epoch, checked + 1)
                    checked = done
        lrs, moms = self.schedule.epoch(epoch)
        self.update.finish_epoch(lrs[steps - 1], moms[steps - 1], steps)
        seen = steps * self.batch_size
        return float(self.losses[:steps].double().mean()), 100 * int(self.hits) / seen, seen

    # -------------------------------------------------------------- capture (CUDA)

    def warm_up(self, steps=WARM_UP_STEPS):
        """Run `steps` steps (on CUDA on the side stream the captures use) and put everything back as
        it was: weights, buffers, optimizer state, figures, step counter and the torch RNG. It compiles
        forward and backward (where compiled) and makes CUDA's lazy set-up (cuDNN, cuBLAS, autograd's
        device thread) happen outside a capture, as CUDA graphs require. compile_s: its seconds."""
        start = time.perf_counter()
        saved = self.snapshot()
        self.t.zero_()  # any step will do: the epoch's first
        cuda = self.device.type == "cuda"
        if cuda:
            self.side = torch.cuda.Stream(self.device)
            self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side) if cuda else contextlib.nullcontext():
            for _ in range(steps):
                self.step()
        if cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
        self.put_back(saved)
        if cuda:
            torch.cuda.synchronize(self.device)
        self.compile_s = time.perf_counter() - start

    def snapshot(self):
        tensors = [*self.model.parameters(), *self.model.buffers(), *self.update.own, self.t, self.hits,
                   self.losses]
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        return [(x, x.detach().clone()) for x in tensors], rng

    def put_back(self, saved):
        tensors, (cpu_rng, cuda_rng) = saved
        with torch.no_grad():
            for x, copy in tensors:
                x.copy_(copy)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)

    def capture(self, steps):
        """Capture `steps` steps as one CUDA graph (the first capture warms up first). Capturing runs
        nothing: the counters and weights are as they were. Every graph shares one memory pool."""
        if self.compile_s is None:
            self.warm_up()
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.side):
            for _ in range(steps):
                self.step()
        self.pool = self.pool or graph.pool()
        self.graphs[steps] = graph
        self.capture_s += time.perf_counter() - start


# ------------------------------------------------------------------ where the time goes

def dynamo_counts():
    """(frames dynamo has compiled, graph breaks, CUDA graphs inductor skipped) in this process so far."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return 0, 0, 0  # nothing compiled in this process yet (and no 2-3 s import to find that out)
    counters = utils.counters
    return (counters["frames"]["total"], sum(counters["graph_break"].values()),
            counters["inductor"]["cudagraph_skips"])


def count_kernels(prof, cuda):
    """CUDA kernels (and copies, fills) a profile saw; on the CPU, the aten ops called from Python."""
    if cuda:
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    return sum(e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
               for e in prof.events())


def explain(ws, gen, steps=5, timed=4 * STEPS_PER_GRAPH):
    """Where WholeStep `ws`'s time goes, as a dict: steps_per_s over `timed` steps run as an epoch
    runs them (graph replays on CUDA), after one untimed pass; kernels, the CUDA kernels of `steps`
    steps (on the CPU, the aten ops called from Python) as torch.profiler counts them; replay_ms, one
    replay of a STEPS_PER_GRAPH-step graph timed with CUDA events, the median of 5 (the GPU's floor:
    no host in it; None without graphs); recompiles, the frames dynamo compiled after the warm-up;
    graph_breaks and cudagraph_skips since ws was built (the whole step uses no CUDA graph trees: a
    skip is someone else's); compile_s (the warm-up: compilation, mostly) and capture_s; peak_mem_mb,
    CUDA's max_memory_allocated since its last reset (None elsewhere). It trains ws's model on
    epoch 1's batches: call it on a WholeStep built to be measured."""
    cuda = ws.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(ws.device)

    def run(n):  # n steps from the epoch's first, as epoch() runs them
        ws.t.zero_()
        for done in range(0, n, STEPS_PER_GRAPH):
            ws.run(min(STEPS_PER_GRAPH, n - done))

    ws.begin(gen, 1)
    if ws.compile_s is None:
        ws.warm_up()
    frames = dynamo_counts()[0]
    timed, steps = min(timed, ws.steps), min(steps, ws.steps)
    run(timed)  # captures the graphs it needs
    sync()
    start = time.perf_counter()
    run(timed)
    sync()
    figures = dict(steps_per_s=round(timed / (time.perf_counter() - start), 1), timed_steps=timed)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    ws.t.zero_()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            ws.step()
        sync()
    figures.update(kernels=count_kernels(prof, cuda), kernel_steps=steps, replay_ms=None,
                   replay_steps=STEPS_PER_GRAPH)
    if ws.graphs and STEPS_PER_GRAPH in ws.graphs:
        times = []
        for _ in range(5):
            ws.t.zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            ws.graphs[STEPS_PER_GRAPH].replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        figures["replay_ms"] = round(sorted(times)[2], 3)
    now = dynamo_counts()
    figures.update(recompiles=now[0] - frames, graph_breaks=now[1] - ws.counts[1],
                   cudagraph_skips=now[2] - ws.counts[2], compile_s=round(ws.compile_s, 2),
                   capture_s=round(ws.capture_s, 2),
                   peak_mem_mb=round(torch.cuda.max_memory_allocated(ws.device) / 2 ** 20, 1) if cuda else None)
    return figures


# ---------------------------------------------------------------- python whole_step.py

VARIANTS = {  # name: (cudagraphs, compile, amp); off CUDA there are no graphs, so "graphs" is eager step() calls
    "graphs": (True, False, False),           # the default: eager kernels, captured on CUDA
    "graphs+compile": (True, True, False),    # inductor's kernels captured
    "compile": (False, True, False),          # no graphs: the host launches every kernel
    "amp+graphs": (True, False, True),
    "amp+graphs+compile": (True, True, True),
}


def measure(name, variant, device, images, labels, epochs):
    """One variant's record: the seconds of epoch 1 (compile, capture) and of each later epoch, and
    explain()'s figures, for recipe `name` on (images, labels) on `device`."""
    cudagraphs, compile, amp = VARIANTS[variant]
    recipe = models.RECIPES[name]
    torch.manual_seed(0)
    model = models.build(recipe, device)
    ws = WholeStep(model, recipe, images, labels, recipe["batch_size"], epochs, amp=amp,
                   cudagraphs=cudagraphs, compile=compile)
    gen, seconds = data.generator(0, device), []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        loss, acc, _ = ws.epoch(gen, epoch, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(round(time.perf_counter() - start, 3))
    later = sorted(seconds[1:])
    return dict(model=name, variant=variant, device=device.type, steps=ws.steps, epoch_seconds=seconds,
                seconds_per_epoch=later[len(later) // 2] if later else None, train_loss=round(loss, 4),
                train_acc=round(acc, 2), **explain(ws, gen))


def main(argv=None):
    import machine
    from errors import first_line, one_line_errors
    from fileio import check_out_file, save_json
    p = argparse.ArgumentParser(description="Time the whole training step (train.py --whole-step) of a recipe "
                                "in each variant and say where the time goes (whole_step.explain).")
    p.add_argument("--model", default="gap10k", help=f"one of: {', '.join(models.RECIPES)} (default gap10k)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="V",
                   help=f"what to measure (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--epochs", type=int, default=3, help="epochs per variant; the first holds compile and "
                   "capture, the median of the rest is seconds_per_epoch (default 3)")
    p.add_argument("--subset", type=int, help="train on the first N training images (default: all 60,000)")
    p.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DIR, then ./data)")
    p.add_argument("--json", help="write the records here, again after every variant")
    args = p.parse_args(argv)
    with one_line_errors():
        models.get_recipe(args.model)
        device = machine.get_device(args.device)
        if args.epochs < 1 or (args.subset is not None and args.subset < 1):
            raise UserError("--epochs and --subset must be at least 1")
        if args.json:
            check_out_file(args.json, "--json")
        images, labels = (t[:args.subset].to(device) for t in data.load("train", args.data_dir))
        out = dict(provenance=machine.provenance(device, torch.get_num_threads()), records=[])
        for variant in args.variants:
            try:
                record = measure(args.model, variant, device, images, labels, args.epochs)
            except Exception as e:  # one broken variant must not lose the others' figures
                record = dict(model=args.model, variant=variant, error=f"{type(e).__name__}: {first_line(e)}"[:300])
            print(" ".join(f"{k}={v}" for k, v in record.items()), flush=True)
            out["records"].append(record)
            if args.json:
                save_json(out, args.json)


if __name__ == "__main__":
    main()
