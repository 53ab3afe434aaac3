"""tests/distributed/driver.py with model-level overrides the driver has no option for (the optimizer-path tests).

    torchrun --nproc_per_node=N tests/distributed/optimizer_paths_driver.py --set model.async_grad_allreduce=false \
        -- DRIVER_ARGS...

Each ``--set KEY=VALUE`` (VALUE read as YAML) is applied to the finetuning YAML the driver loads; everything after
``--`` goes to the driver unchanged. The driver replaces model.optim as a whole, so model.optim.* cannot be set here.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    split = sys.argv.index("--")
    sets = [value for flag, value in zip(sys.argv[1:split:2], sys.argv[2:split:2]) if flag == "--set"]
    from omegaconf import OmegaConf, open_dict

    import nemo_tiedlora.nemo.finetune as finetune

    original = finetune.tuning_config

    def tuning_config(name: str = "finetuning"):
        cfg = original(name)
        with open_dict(cfg):
            for item in sets:
                key, _, value = item.partition("=")
                OmegaConf.update(cfg, key, OmegaConf.create(f"v: {value}").v, force_add=True)
        return cfg

    finetune.tuning_config = tuning_config
    driver = Path(__file__).with_name("driver.py")
    sys.argv = [str(driver), *sys.argv[split + 1:]]
    runpy.run_path(str(driver), run_name="__main__")


if __name__ == "__main__":
    main()
