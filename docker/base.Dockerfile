# The node base when a registry answers (docker/build-base.sh picks this or debootstrap).
ARG FROM=debian:bookworm-slim
FROM ${FROM}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      openssh-server python3 python3-venv ca-certificates >/dev/null \
 && rm -f /etc/ssh/ssh_host_* \
 && rm -rf /var/lib/apt/lists/*
