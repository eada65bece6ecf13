# hello.nomad.hcl: the smallest deskvm job (command mode). Nomad renders a shell script into
# the task dir; deskvm boots a fresh VM from the guest kit, shares the task dir into it at
# /local, /secrets and /alloc, and runs the script there. Its output streams to
# `nomad alloc logs`, and its exit code is the task's.
job "hello" {
  type = "batch"

  group "hello" {
    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    task "pi" {
      driver = "deskvm"

      config {
        command = "/local/pi.sh"
        args    = ["20000"]
      }

      template {
        destination = "local/pi.sh"
        perms       = "755"
        data        = <<-EOT
          #!/bin/sh
          echo "hello from the guest $(hostname), kernel $(uname -r), $(nproc) vCPU(s)"
          echo "task dir is $NOMAD_TASK_DIR, alloc $NOMAD_ALLOC_ID"
          awk -v n="$1" 'BEGIN { s = 0; for (k = 0; k < n; k++) s += (k % 2 ? -4 : 4) / (2 * k + 1); printf "pi is about %.5f after %d terms\n", s, n }'
        EOT
      }

      resources {
        cpu    = 1000
        memory = 256
      }
    }
  }
}
