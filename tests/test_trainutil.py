import time

import torch

from bonefrac.config import OptimConfig
from bonefrac.trainutil import Ema, Watchdog, make_optimizer, make_scheduler, rescale_schedule_state


def test_watchdog_fires_without_beats_and_not_with_them():
    fired = []
    dog = Watchdog(0.4, on_timeout=lambda: fired.append(1), exit_process=False)
    time.sleep(1.2)
    assert fired == [1] and dog.fired.is_set()

    calm = []
    dog = Watchdog(0.4, on_timeout=lambda: calm.append(1), exit_process=False)
    for _ in range(10):
        dog.beat()
        time.sleep(0.1)
    dog.stop()
    assert calm == []
    # stop() waits for the thread and drops the callback (it holds the run): a daemon thread releasing tensors
    # while the interpreter shut down aborted about one `make demo` in three
    assert not dog._thread.is_alive() and dog.on_timeout is None


def test_cosine_schedule_warms_up_then_decays():
    model = torch.nn.Linear(2, 2)
    ocfg = OptimConfig(lr=1.0, warmup_epochs=1, min_lr_ratio=0.0)
    opt = make_optimizer(model, ocfg, 16, torch.device("cpu"))
    sched = make_scheduler(opt, ocfg, steps_per_epoch=10, epochs=3)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[9] and abs(max(lrs) - 1.0) < 1e-6
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_a_schedule_saved_by_two_processes_resumes_at_the_same_point_with_one():
    """2 processes take half the steps per epoch: resumed in 1 process after 2 of 4 epochs, the learning rate goes
    on from the middle of the schedule (the raw step count would put it at a quarter, i.e. too high)."""
    ocfg = OptimConfig(lr=1.0, warmup_epochs=0, min_lr_ratio=0.0)

    def run(steps_per_epoch, epochs_done, state=None):
        opt = make_optimizer(torch.nn.Linear(2, 2), ocfg, 16, torch.device("cpu"))
        sched = make_scheduler(opt, ocfg, steps_per_epoch=steps_per_epoch, epochs=4)
        if state:
            sched.load_state_dict(state["scheduler"])
        for _ in range(epochs_done * steps_per_epoch):
            opt.step()
            sched.step()
        return sched

    saved = {"scheduler": run(5, 2).state_dict(), "epoch": 2, "lr_anchor": (6, 0.8)}
    rescale_schedule_state(saved, steps_per_epoch=10)
    assert saved["scheduler"]["last_epoch"] == 20 and saved["lr_anchor"] == (12, 0.8)
    resumed = run(10, 0, saved)
    assert abs(resumed.lr_lambdas[0](resumed.last_epoch) - 0.5) < 1e-9  # halfway down the cosine
    plateau = {"scheduler": {"last_epoch": 2, "best": 0.5}, "epoch": 2}
    rescale_schedule_state(plateau, steps_per_epoch=10)
    assert plateau["scheduler"]["last_epoch"] == 2  # per-epoch schedules are left alone


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1), 8, torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def test_linear_lr_scaling():
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model, OptimConfig(lr=1e-3, lr_base_batch=64), 256, torch.device("cpu"))
    assert abs(opt.param_groups[0]["lr"] - 4e-3) < 1e-12


def test_ema_moves_towards_the_weights():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = Ema(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert abs(ema.module.weight.item() - 0.5) < 1e-6


def test_consumers_reject_choices_outside_the_configs_list():
    """A Config built in code skips `validate`; the code that reads a string setting still names key and choices."""
    import pytest

    from bonefrac.config import Config, TrainConfig
    from bonefrac.errors import BonefracError
    from bonefrac.distributed import use_compile

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(BonefracError, match=r"optim.schedule must be one of cosine, plateau, constant, not 'cosin'"):
        make_scheduler(opt, OptimConfig(schedule="cosin"), steps_per_epoch=10, epochs=3)
    with pytest.raises(BonefracError, match=r"optim.name must be one of adamw, adam, not 'sgd'"):
        make_optimizer(torch.nn.Linear(2, 2), OptimConfig(name="sgd"), 8, torch.device("cpu"))
    with pytest.raises(BonefracError, match=r"train.compile must be one of auto, on, off, not 'yes'"):
        use_compile(Config(train=TrainConfig(compile="yes")), torch.device("cpu"))
