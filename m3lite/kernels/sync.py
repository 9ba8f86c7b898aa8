"""A spin barrier for compiled code, so that a decode step is one parallel region instead of one per kernel.

Numba launches a thread team for every prange loop; on this 2-core machine a launch costs ~8-15 us, and a decode
step has five dependent phases per layer (projections, attention, output projection, MLP up, MLP down): ~40
launches per token cost more than the small models' arithmetic. Instead the engine runs one prange over its
threads and separates the phases with `barrier`, which costs a few hundred nanoseconds: threads wait by spinning
on an atomic counter, as llama.cpp's thread pool does.

The prange must run its n iterations on n distinct threads at the same time (numba's omp and workqueue layers do:
one chunk per thread when the iteration count equals the thread count), else the first barrier never opens.
"""
import os
import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_I64 = ir.IntType(64)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
COUNT, GEN = 0, 8  # slots of the state array: arrivals and generation, on different cache lines
STATE_SIZE = 16
SPINS = 1 << 11  # pauses (~20-100 us) before a waiting thread starts sleeping: see `barrier`
SLEEP_US = 20


def _slot(context, builder, aryty, ary, idx):
    return builder.gep(context.make_array(aryty)(context, builder, ary).data, [idx])


@intrinsic
def _atomic_add(typingctx, a, i, v):
    """a[i] += v atomically (sequentially consistent); returns the old value. a: int64 array."""
    if not (isinstance(a, types.Array) and a.dtype == types.int64 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        idx = context.cast(builder, args[1], sig.args[1], types.int64)
        val = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", _slot(context, builder, sig.args[0], args[0], idx), val, "seq_cst")

    return types.int64(a, i, v), codegen


@intrinsic
def _atomic_load(typingctx, a, i):
    """a[i], read atomically (sequentially consistent). a: int64 array."""
    if not (isinstance(a, types.Array) and a.dtype == types.int64 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        idx = context.cast(builder, args[1], sig.args[1], types.int64)
        return builder.load_atomic(_slot(context, builder, sig.args[0], args[0], idx), "seq_cst", 8)

    return types.int64(a, i), codegen


@intrinsic
def _pause(typingctx):
    """The spin-wait hint (x86 `pause`: lets the sibling hyper-thread run, saves power); nothing elsewhere."""
    def codegen(context, builder, sig, args):
        if _X86:
            fn = builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _sleep(typingctx, us):
    """usleep(us) (POSIX); nothing elsewhere."""
    if not isinstance(us, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        if os.name == "posix":
            i32 = ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [i32]), "usleep")
            builder.call(fn, [context.cast(builder, args[0], sig.args[0], types.int32)])
        return context.get_dummy_value()

    return types.none(us), codegen


@njit(cache=True, error_model="numpy")
def barrier(state, n):
    """Wait until n threads have called barrier(state, n) (state: int64 [STATE_SIZE], zeros before first use).

    A waiting thread spins, then sleeps in short naps: when another process has taken the core of a thread
    that has not arrived yet, the nap frees this core for it (the scheduler moves it here), so a busy machine
    costs tens of microseconds per barrier instead of a 4 ms time slice."""
    if n <= 1:
        return
    gen = _atomic_load(state, GEN)
    if _atomic_add(state, COUNT, 1) == n - 1:
        _atomic_add(state, COUNT, -n)  # the last to arrive resets the count, then opens the barrier
        _atomic_add(state, GEN, 1)
    else:
        spins = 0
        while _atomic_load(state, GEN) == gen:
            if spins < SPINS:
                spins += 1
                _pause()
            else:
                _sleep(SLEEP_US)


@njit(cache=True, error_model="numpy", inline="always")
def part(n, t, T):
    """The share [r0, r1) of thread t of T in range(n)."""
    return n * t // T, n * (t + 1) // T
