# Try it from a second shell, in the checkout (`make run` keeps the daemon in the foreground):
export PATH="$PWD/.venv/bin:$PATH" ENVCTL_SOCKET="$PWD/var/run/envctld.sock"
# 1. Files written with a private umask by a member of the root's group (as root: the demo
#    account envctl-demo; root's own files are never touched): elsewhere they stay private;
#    in the shared root the daemon shares them with the group as they appear
mkdir -p -m 1777 var/elsewhere
W=$([ "$(id -u)" != 0 ] || echo setpriv --reuid=envctl-demo --regid=envctl-demo --init-groups)
$W sh -c 'umask 077; mkdir -p var/envs/demo; touch var/elsewhere/a.csv var/envs/demo/a.csv'
sleep 1                                 # the daemon heals as files appear (ms); a busy host: a moment
envctl check --config var/dev.yaml      # exit 0: nothing left to fix in the root
ls -l var/elsewhere/a.csv var/envs/demo/a.csv   # -rw------- elsewhere, -rw-rw---- in the root
envctl status                           # FIXED: what the daemon healed
# 2. An environment built by the daemon (an empty venv: no network needed), then used
echo 'dependencies: []' | envctl request create demo-env -f - --replace  # each run: a new version
var/envs/demo-env/bin/python -c 'import sys; print(sys.prefix)'
# 3. Everything checked as you: one line per check, the fix under each ✗ (conda's envs_dirs
#    does not list the demo root, say: doctor exits 1 and says how to add it)
envctl doctor demo-env || echo "doctor: fix the ✗ lines above"
