"""Local multi-node Flower deployments on loopback (``python -m deploy --help``).

One SuperLink and N SuperNodes as real daemons on 127.0.0.1, in one of three modes
(``insecure``, ``tls``, ``tls-auth``). The modules, one job each:

* :mod:`deploy.state`: the state directory (layout, ``deployment.json``, keys);
* :mod:`deploy.certs`: the TLS certificates, renewed before they expire;
* :mod:`deploy.processes`: daemons started and stopped by PID (and start time), reaping;
* :mod:`deploy.ports`: loopback ports;
* :mod:`deploy.flower_cli`: the ``flower-superlink`` / ``flower-supernode`` / ``flwr`` command
  lines and environments;
* :mod:`deploy.data`: whether the data folder holds the run's dataset;
* :mod:`deploy.run_config`: the run config, checked before submission;
* :mod:`deploy.runs`: a run submitted, followed, and judged by the SuperLink's record;
* :mod:`deploy.nodes`: start or stop one daemon, wait until the daemons are up;
* :mod:`deploy.commands`: ``up``, ``down``, ``status``, ``run``;
* :mod:`deploy.cli` (``python -m deploy``): the command line; :mod:`deploy.local` is an alias.
"""
