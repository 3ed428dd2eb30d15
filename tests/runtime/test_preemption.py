import os
import signal

from latentlm_mcore.runtime.preemption import PreemptionFlag, any_rank


def test_stop_signals_set_the_flag_and_restore_the_previous_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with PreemptionFlag() as flag:
        assert flag.received is None and not flag.any_rank()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.received == "SIGUSR1" and flag.any_rank()  # the first signal is the one named
    assert {s: signal.getsignal(s) for s in before} == before
    assert any_rank(False, True) == [False, True]  # no process group: the flags as given
