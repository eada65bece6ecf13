// Command nomad-driver-deskvm is the deskvm Nomad task driver plugin.
package main

import (
	"github.com/deskcloud/deskcloud/driver/deskvm"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins"
)

func main() {
	plugins.Serve(func(logger hclog.Logger) interface{} { return deskvm.NewDriver(logger) })
}
