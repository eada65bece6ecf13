package ownerload

import (
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

func TestSpin(t *testing.T) {
	must.Eq(t, 88172645463325252, Spin(0))
	must.NotEq(t, Spin(1000), Spin(1001), must.Sprint("every round changes the result"))
	must.Eq(t, Spin(1000), Spin(1000))
}

func TestCalibrate(t *testing.T) {
	// How many rounds fit depends on the machine and its load, which a test cannot assert;
	// that some do is all it can.
	must.Positive(t, Calibrate(10*time.Millisecond))
}
