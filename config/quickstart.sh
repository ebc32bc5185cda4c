# Try it from a second shell, in the checkout (`make run` keeps the daemon in the foreground):
export ENVCTL_SOCKET=$PWD/var/run/envctld.sock
# 1. Files written with a private umask, by another user (root's own files are never touched):
#    elsewhere they stay private; in the shared root the daemon shares them as they appear
mkdir -p -m 1777 var/elsewhere && chmod 1777 var/envs
W=$([ "$(id -u)" != 0 ] || echo setpriv --reuid=nobody --regid=nogroup --clear-groups)
$W sh -c 'umask 077; mkdir var/envs/demo; touch var/elsewhere/a.csv var/envs/demo/a.csv'
.venv/bin/envctl check --config var/dev.yaml        # exit 0: nothing left to fix in the root
ls -l var/elsewhere/a.csv var/envs/demo/a.csv       # -rw------- elsewhere, -rw-rw---- in the root
.venv/bin/envctl status                             # FIXED: what the daemon healed
# 2. An environment built by the daemon (an empty venv: no network needed), then used
echo 'dependencies: []' | .venv/bin/envctl request create demo-env -f -
var/envs/demo-env/bin/python -c 'import sys; print(sys.prefix)'
