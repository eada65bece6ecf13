// Package predictor forecasts when a desktop's owner will return, so that deskcloud can
// drain a harvested desktop before its owner sits down at it.
//
// A [Model] belongs to one desktop. It is fed that desktop's own activity, one state change
// at a time ([Model.Observe]), and answers with a [Forecast]: the probability that the owner
// is active within each of [Horizons] and the expected idle time left. The model learns
// online from its own history; a new desktop starts from a [Pool], a small fleet-level prior
// built from many desktops, and drifts away from it as its own samples arrive.
//
// Raw activity never leaves the desktop: the model and its history live on the node, are
// persisted there with [WriteModelFile] (bounded, atomic, checksummed), and only the
// forecast is published.
//
// The model is described, with its measured quality, in docs/forecast.md.
package predictor
