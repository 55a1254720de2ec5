"""Tensor-parallel processes: rank 0 drives, N - 1 spawned workers replay each step's forward.

Rank 0 is the process that serves (HTTP, scheduler, block manager, sampler); its LLMEngine
starts a `TPDriver` and hands it to its ModelRunner. The driver spawns the workers
(torch.multiprocessing, spawn), joins the torch.distributed group (NCCL on CUDA, gloo on the
CPU) and, every step, broadcasts a compact encoding of the batch the runner built. Each worker holds its shard (model/layers/parallel.py)
and its KV heads, rebuilds the attention metadata from the broadcast and runs the same forward
and the same LM-head calls, so every all-reduce and logits gather meets its peers.

One step on the wire (a gloo group on CPU tensors, also on CUDA: an idle worker waits there
without spinning a GPU kernel): a header of HEADER_LEN int64 `[command, num_tokens, num_seqs,
num_table_entries, num_score_rows, num_sample_rows, num_blocks, 0]`, then for STEP one int64
payload `input_ids | positions | seq_lens | query_lens | table_lens | block tables (flat) |
score_rows | sample_rows`. A worker replays the LM-head calls as ModelRunner.run makes them:
the score rows in chunks of SCORE_ROWS_PER_CALL, then the sample rows.

Failure: a watchdog thread on rank 0 waits on the workers' process sentinels; a worker that
exits unasked logs an error and ends rank 0 at once with exit code 1 (a collective it is blocked
in would never return). Rank 0's collectives time out after COLLECTIVE_TIMEOUT_S; a worker
exits when its parent does. `stop()` (also at exit) sends STOP and joins every worker.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import replace
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from model.config import ModelConfig
from model.engine.config import EngineConfig
from model.engine.model_runner import SCORE_ROWS_PER_CALL, ModelRunner
from model.layers.attention.metadata import build_attention_metadata
from model.layers.parallel import TPContext, check_tp_size

logger = logging.getLogger("nanoserve.distributed")

STOP, STEP, PROFILE = 0, 1, 2
HEADER_LEN = 8
COLLECTIVE_TIMEOUT_S = 60.0  # rank 0: a step's collectives; the watchdog catches deaths sooner
# A worker waits for the next step as long as the server is idle: its own timeout never fires
# first; it leaves when rank 0 sends STOP or exits.
WORKER_TIMEOUT_S = 365 * 24 * 3600.0
PARENT_POLL_S = 0.5
STOP_TIMEOUT_S = 10.0


def free_init_method() -> str:
    """A tcp:// rendezvous on a free local port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """The config one rank runs: its own GPU on CUDA, its share of the cores on the CPU."""
    if config.device.startswith("cuda"):
        return replace(config, device=config.rank_device(rank))
    if config.num_threads is None:
        threads = max(1, (os.cpu_count() or 1) // config.tensor_parallel_size)
        return replace(config, num_threads=threads)
    return config


def _join_group(
    config: EngineConfig, rank: int, init_method: str, timeout_s: float
) -> tuple[TPContext, dist.ProcessGroup]:
    """Joins the group; returns this rank's TPContext and the (gloo) group steps travel on."""
    backend = backend_for(config.device)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend,
        init_method=init_method,
        world_size=config.tensor_parallel_size,
        rank=rank,
        timeout=timeout,
    )
    control = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo")
    tp = TPContext(rank, config.tensor_parallel_size, None, backend, device)
    return tp, control


class TPDriver:
    """Rank 0's side: spawns and watches the workers, sends each step, stops them."""

    def __init__(self, config: EngineConfig) -> None:
        """Raises ValueError, before starting anything, for a size the model cannot take."""
        size = config.tensor_parallel_size
        check_tp_size(ModelConfig.from_dir(config.model_dir), size)
        init_method = config.distributed_init_method or free_init_method()
        self._stopping = False
        self._context = torch_mp.start_processes(
            _worker_main,
            args=(config, init_method, os.getpid(), logging.getLogger().level),
            nprocs=size - 1,
            join=False,
            daemon=True,
            start_method="spawn",
        )
        self.processes = list(self._context.processes)
        threading.Thread(target=self._watch, name="nanoserve-tp-watchdog", daemon=True).start()
        own = _rank_config(config, 0)
        if own.num_threads:
            torch.set_num_threads(own.num_threads)
        self.tp, self._control = _join_group(own, 0, init_method, COLLECTIVE_TIMEOUT_S)
        self.backend = self.tp.backend
        atexit.register(self.stop)
        logger.info(
            "tensor parallel: %d ranks over %s, workers %s",
            size,
            self.backend,
            [p.pid for p in self.processes],
        )

    def send_step(
        self,
        num_blocks: int,
        input_ids: list[int],
        positions: list[int],
        seq_lens: list[int],
        query_lens: list[int],
        block_tables: list[list[int]],
        score_rows: list[int],
        sample_rows: list[int],
    ) -> None:
        """Broadcast one step's batch (ModelRunner.run's lists) to the workers."""
        table_lens = [len(t) for t in block_tables]
        header = [
            STEP,
            len(input_ids),
            len(seq_lens),
            sum(table_lens),
            len(score_rows),
            len(sample_rows),
            num_blocks,
            0,
        ]
        payload = list(
            itertools.chain(
                input_ids,
                positions,
                seq_lens,
                query_lens,
                table_lens,
                itertools.chain.from_iterable(block_tables),
                score_rows,
                sample_rows,
            )
        )
        self._broadcast(header)
        self._broadcast(payload)

    def send_profile(self) -> None:
        """Workers size their KV pool with ModelRunner.num_blocks_for_gpu alongside rank 0."""
        self._broadcast([PROFILE] + [0] * (HEADER_LEN - 1))

    def _broadcast(self, values: list[int]) -> None:
        dist.broadcast(torch.tensor(values, dtype=torch.long), src=0, group=self._control)

    def stop(self) -> None:
        """STOP to every worker, then join them (killing any that lingers). Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if all(p.is_alive() for p in self.processes):
            try:
                self._broadcast([STOP] + [0] * (HEADER_LEN - 1))
            except (RuntimeError, dist.DistBackendError) as exc:
                logger.warning("could not send STOP to the workers: %s", exc)
        for process in self.processes:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                logger.warning("worker pid %d did not stop; killing it", process.pid)
                process.kill()
                process.join()
        if dist.is_initialized():
            dist.destroy_process_group()

    def fail(self, message: str) -> None:
        """The group is unusable (a rank died or a step failed midway): kill the workers and
        end this process with exit code 1; nothing it still runs could finish."""
        self._stopping = True
        logger.error("%s; stopping every rank", message)
        for process in self.processes:
            if process.is_alive():
                process.kill()
        logging.shutdown()
        os._exit(1)

    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.processes, start=1)}
        ready = wait(list(sentinels))
        if self._stopping:
            return
        rank = sentinels[ready[0]]
        process = self.processes[rank - 1]
        process.join(STOP_TIMEOUT_S)  # it has exited: this only reaps it (exitcode was None)
        code = process.exitcode
        self.fail(f"tensor-parallel worker rank {rank} exited with code {code}")


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _worker_main(
    index: int, config: EngineConfig, init_method: str, parent_pid: int, log_level: int
) -> None:
    """Rank index + 1: load the shard, then replay steps until STOP."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group; rank 0 decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    rank = index + 1
    config = _rank_config(config, rank)
    try:
        tp, control = _join_group(config, rank, init_method, WORKER_TIMEOUT_S)
        runner = ModelRunner(config, tp=tp)
        _serve_steps(runner, control)
    except Exception:
        logger.exception("tensor-parallel worker rank %d failed", rank)
        raise
    dist.destroy_process_group()


def _receive(length: int, group: dist.ProcessGroup) -> torch.Tensor:
    values = torch.empty(length, dtype=torch.long)
    dist.broadcast(values, src=0, group=group)
    return values


@torch.inference_mode()
def _serve_steps(runner: ModelRunner, control: dist.ProcessGroup) -> None:
    config = runner.config
    while True:
        header = _receive(HEADER_LEN, control).tolist()
        command = header[0]
        if command == STOP:
            return
        if command == PROFILE:
            runner.num_blocks_for_gpu(config.gpu_memory_utilization, config.max_num_batched_tokens)
            continue
        assert command == STEP, f"unknown command {command}"
        num_tokens, num_seqs, num_entries, num_score, num_sample, num_blocks = header[1:7]
        if runner.num_blocks != num_blocks:
            runner.allocate_kv_cache(num_blocks)
        payload = _receive(
            2 * num_tokens + 3 * num_seqs + num_entries + num_score + num_sample, control
        )
        sizes = [num_tokens, num_tokens, num_seqs, num_seqs, num_seqs, num_entries, num_score]
        ids, pos, seq_lens, query_lens, table_lens, tables, score_rows, sample_rows = payload.split(
            [*sizes, num_sample]
        )
        flat = tables.tolist()
        starts = list(itertools.accumulate(table_lens.tolist(), initial=0))
        block_tables = [flat[a:b] for a, b in itertools.pairwise(starts)]
        device = runner.device
        meta = build_attention_metadata(
            seq_lens.tolist(), query_lens.tolist(), block_tables, config.block_size, device
        )
        hidden = runner.model(ids.to(device), pos.to(device), runner.kv_cache, meta)
        score_rows = score_rows.to(device)
        for lo in range(0, num_score, SCORE_ROWS_PER_CALL):
            runner.model.compute_logits(hidden[score_rows[lo : lo + SCORE_ROWS_PER_CALL]])
        if num_sample:
            runner.model.compute_logits(hidden[sample_rows.to(device)])
