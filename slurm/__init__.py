"""SLURM launchers, installed as `open_clip_hn.slurm` (pyproject maps this folder): `submit.py`
(submitit: `python -m open_clip_hn.slurm.submit`), `train.sbatch` (plain sbatch + srun) and
`cluster.sh` (a two-node SLURM on one machine, for trying them). See README.md here."""
